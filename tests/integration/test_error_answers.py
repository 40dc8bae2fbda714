"""Request errors over HTTP: each refusal is JSON with a code from the one table, never a bare 500."""

from __future__ import annotations

import dataclasses

from litestar import Litestar
from litestar.testing import TestClient

from cliplens.settings import Settings
from tests.conftest import photo_bytes, running

Client = TestClient[Litestar]


def test_an_unknown_path_and_a_wrong_method_are_json_with_a_code(client: Client) -> None:
    missing = client.get("/v1/nothing-here")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "route_not_found"
    wrong = client.get("/v1/embeddings")
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"


def test_malformed_json_has_the_invalid_body_code(client: Client) -> None:
    response = client.post(
        "/v1/embeddings", content=b'{"input": [', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_body"


def test_the_upload_route_refuses_an_unknown_encoding_format_like_the_json_route(client: Client) -> None:
    files = [("files", ("a.jpg", photo_bytes("album/1/a.jpg"), "image/jpeg"))]
    response = client.post("/v1/embeddings/upload", files=files, data={"encoding_format": "int8"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_body"


def test_a_closed_model_worker_answers_503_shutting_down(client: Client) -> None:
    """Requests that reach the model while it stops get the drain's 503, not a generic 500."""
    service = client.app.state.runtime.service
    client.blocking_portal.call(service.batcher.close)
    response = client.post("/v1/embeddings", json={"input": ["album/1/a.jpg"]})
    assert response.status_code == 503
    error = response.json()["error"]
    assert (error["code"], error["type"]) == ("shutting_down", "service_unavailable")
    assert response.headers["retry-after"] == "1"


def test_a_body_that_can_never_fit_in_half_the_memory_budget_is_413(settings: Settings) -> None:
    """A body larger than half the budget would be refused with 429 forever; it gets 413 at once."""
    with running(dataclasses.replace(settings, memory_budget_bytes=16 * 2**20)) as client:
        response = client.post("/v1/embeddings", json={"input": ["x" * (9 * 2**20)]})
        assert response.status_code == 413
        error = response.json()["error"]
        assert error["code"] == "body_too_large" and "CLIPLENS_MEMORY_BUDGET_BYTES" in error["message"]
        assert client.post("/v1/embeddings", json={"input": ["album/1/a.jpg"]}).status_code == 200
