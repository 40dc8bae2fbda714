"""The HTTP contract of /v1/embeddings and friends, on the local-directory source."""

from __future__ import annotations

import base64
import dataclasses
import re

import numpy as np
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from cliplens.settings import Settings
from cliplens.vocabulary import Stage
from tests.conftest import photo_bytes, running

Client = TestClient[Litestar]


def vector(entry: dict[str, object]) -> np.ndarray:
    embedding = entry["embedding"]
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)


def test_partial_failure_keeps_the_good_items_in_order(client: Client) -> None:
    data_uri = "data:image/jpeg;base64," + base64.b64encode(photo_bytes("album/2/c.jpg")).decode()
    inputs = ["album/1/a.jpg", "album/missing.jpg", data_uri, "../outside.jpg", "album/1/b.jpg"]
    response = client.post("/v1/embeddings", json={"input": inputs})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert body["model"] == client.get("/v1/models").json()["data"][0]["id"]
    assert [d["index"] for d in body["data"]] == [0, 2, 4]
    assert all(d["object"] == "embedding" for d in body["data"])
    assert {(e["index"], e["code"]) for e in body["errors"]} == {(1, "not_found"), (3, "forbidden")}
    assert body["errors"][0]["input"] == "album/missing.jpg"
    assert body["usage"]["images"] == 3
    for entry in body["data"]:
        assert vector(entry).shape == (32,)
        assert np.linalg.norm(vector(entry)) == pytest.approx(1.0, abs=1e-5)


def test_a_single_string_input_and_identical_images_give_identical_vectors(client: Client) -> None:
    one = client.post("/v1/embeddings", json={"input": "album/1/a.jpg"}).json()
    data_uri = "data:image/jpeg;base64," + base64.b64encode(photo_bytes("album/1/a.jpg")).decode()
    two = client.post("/v1/embeddings", json={"input": [data_uri]}).json()
    assert len(one["data"]) == len(two["data"]) == 1
    np.testing.assert_allclose(vector(one["data"][0]), vector(two["data"][0]), atol=1e-6)


def test_base64_encoding_is_little_endian_float32_of_the_same_vector(client: Client) -> None:
    floats = client.post("/v1/embeddings", json={"input": ["album/1/b.jpg"]}).json()["data"][0]
    packed = client.post("/v1/embeddings", json={"input": ["album/1/b.jpg"], "encoding_format": "base64"})
    entry = packed.json()["data"][0]
    assert isinstance(entry["embedding"], str)
    np.testing.assert_array_equal(vector(entry), vector(floats))


HEADER_ROUNDING_MS = 0.05 + 0.0005 + 1e-9
"""Server-Timing durations are rounded to 0.1 ms, per-image `timings` to 0.001 ms."""


def test_server_timing_and_trace_id_headers(client: Client) -> None:
    body = {"input": ["album/1/a.jpg", "album/1/b.jpg", "album/2/c.jpg"], "timings": True}
    response = client.post("/v1/embeddings", json=body)
    entries = {k: float(v) for k, v in re.findall(r"(\w+);dur=([0-9.]+)", response.headers["server-timing"])}
    assert list(entries) == [*Stage, "total"], "one entry per stage, in order, then the total"
    images = [item["stages"] for item in response.json()["timings"]]
    assert len(images) == 3
    for stage in Stage:
        # A stage's window runs from the first image handed to it to the last one done: it holds
        # every image's own wait + work in that stage.
        longest = max(image[stage]["queue_ms"] + image[stage]["work_ms"] for image in images)
        assert entries[stage] >= longest - HEADER_ROUNDING_MS, (stage, entries, images)
        assert entries["total"] >= entries[stage] - HEADER_ROUNDING_MS, (stage, entries)
    # An image crosses the stages one after the other, all inside the request: its whole journey
    # fits in the total, and so does the longest stage of the request.
    journeys = [sum(times["queue_ms"] + times["work_ms"] for times in image.values()) for image in images]
    assert entries["total"] >= max(journeys) - len(Stage) * 0.0005 - 0.05
    assert entries[Stage.EMBED] > 0, "a forward pass of the model takes time"
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-trace-id"])
    assert response.headers["x-trace-id"] != "0" * 32


def test_text_modality_uses_the_text_tower(client: Client) -> None:
    response = client.post(
        "/v1/embeddings", json={"input": ["a dog on a beach", "a cat"], "modality": "text"}
    )
    assert response.status_code == 200
    body = response.json()
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert body["usage"]["prompt_tokens"] > 4
    assert body["usage"]["images"] == 0
    assert not np.allclose(vector(body["data"][0]), vector(body["data"][1]))
    assert "embed;dur=" in response.headers["server-timing"]


def test_upload_embeds_multipart_files_named_by_file_name(client: Client) -> None:
    files = [
        ("files", ("a.jpg", photo_bytes("album/1/a.jpg"), "image/jpeg")),
        ("files", ("notes.txt", b"not an image", "text/plain")),
    ]
    response = client.post("/v1/embeddings/upload", files=files, data={"encoding_format": "base64"})
    assert response.status_code == 200
    body = response.json()
    assert [d["index"] for d in body["data"]] == [0]
    assert body["errors"] == [
        {
            "index": 1,
            "input": "notes.txt",
            "code": "unsupported_format",
            "message": body["errors"][0]["message"],
        }
    ]
    reference = client.post("/v1/embeddings", json={"input": ["album/1/a.jpg"]}).json()["data"][0]
    np.testing.assert_allclose(vector(body["data"][0]), vector(reference), atol=1e-6)
    assert "x-trace-id" in response.headers


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"input": []}, 422, "empty_input"),
        ({"input": ["a.jpg"], "model": "ViT-H-14/other"}, 404, "model_not_found"),
        ({"input": ["a.jpg"], "dimensions": 16}, 400, "unsupported_dimensions"),
        ({"inputs": ["a.jpg"]}, 400, "invalid_body"),
        ({"input": [1, 2]}, 400, "invalid_body"),
        ({"input": ["a.jpg"], "encoding_format": "int8"}, 400, "invalid_body"),
        ({"input": ["a.jpg"], "modality": "audio"}, 400, "invalid_body"),
        ({"input": ["album/1/a.jpg"] * 17}, 413, "too_many_items"),
    ],
)
def test_request_level_errors_are_json_that_names_the_problem(
    client: Client, body: dict[str, object], status: int, code: str
) -> None:
    response = client.post("/v1/embeddings", json=body)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code
    assert error["message"]


def test_malformed_json_is_a_400(client: Client) -> None:
    response = client.post(
        "/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "error" in response.json()


def test_a_body_over_the_limit_is_a_413(settings: Settings) -> None:
    with running(dataclasses.replace(settings, max_body_bytes=4096)) as client:
        response = client.post("/v1/embeddings", json={"input": ["x" * 5000]})
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "body_too_large"


def test_the_model_name_may_be_the_full_id_or_the_architecture(client: Client) -> None:
    model = client.get("/v1/models").json()["data"][0]
    for name in (model["id"], model["architecture"]):
        assert (
            client.post("/v1/embeddings", json={"input": "album/1/a.jpg", "model": name}).status_code == 200
        )


def test_one_model_is_retrieved_by_its_id_or_architecture_and_others_are_404(client: Client) -> None:
    listed = client.get("/v1/models").json()["data"][0]
    for name in (listed["id"], listed["architecture"]):
        response = client.get(f"/v1/models/{name}")
        assert response.status_code == 200, response.text
        assert response.json() == listed
    missing = client.get("/v1/models/ViT-H-14/other")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_models_reports_dimension_device_dtype_and_random_weights(client: Client) -> None:
    model = client.get("/v1/models").json()["data"][0]
    assert model["dimension"] == 32
    assert model["device"] == "cpu"
    assert model["dtype"] in ("float32", "bfloat16")
    assert model["random_weights"] is True
    assert "random weights" in model["warning"]
    assert model["id"].endswith("/random")


def test_probes_and_schema(client: Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "detail": None}
    assert client.get("/readyz").status_code == 200
    schema = client.get("/schema/openapi.json").json()
    assert "/v1/embeddings" in schema["paths"]
    assert "/v1/embeddings/upload" in schema["paths"]


def test_not_ready_means_503_with_the_reason(settings: Settings, tmp_path: object) -> None:
    broken = dataclasses.replace(settings, model="local-dir:/nonexistent/model")
    with TestClient(__import__("cliplens.app", fromlist=["create_app"]).create_app(broken)) as client:
        deadline = 100
        while deadline and "failed" not in client.get("/readyz").text:
            deadline -= 1
            __import__("time").sleep(0.05)
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert "failed to load" in ready.json()["detail"]
        response = client.post("/v1/embeddings", json={"input": ["album/1/a.jpg"]})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "model_not_ready"
        assert response.headers["retry-after"]
        assert client.get("/healthz").status_code == 200
