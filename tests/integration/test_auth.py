"""Optional bearer-token authentication: the API needs a token, probes and metrics never do."""

from __future__ import annotations

import hmac
from collections.abc import Iterator, Mapping
from pathlib import Path

import openai
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from cliplens.api import auth
from cliplens.experiment.inprocess import InProcessService
from cliplens.settings import Settings
from tests.conftest import photo_bytes, running

Client = TestClient[Litestar]
TOKENS = ("first-token-0123456789", "second-token-abcdef")


@pytest.fixture(scope="module")
def secured(tiny_model: str, photo_dir: Path) -> Settings:
    return Settings(
        model=tiny_model, pretrained="none", image_root=photo_dir, cpu_workers=2, api_tokens=TOKENS
    )


@pytest.fixture(scope="module")
def client(secured: Settings) -> Iterator[Client]:
    with running(secured) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def images_served(client: Client) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "cliplens_images_total" and sample.labels == {"outcome": "ok"}:
                return float(sample.value)
    raise AssertionError("cliplens_images_total{outcome=ok} is missing")


def assert_unauthorized(response: object) -> None:
    assert response.status_code == 401  # type: ignore[attr-defined]
    assert response.headers["www-authenticate"].startswith("Bearer")  # type: ignore[attr-defined]
    error = response.json()["error"]  # type: ignore[attr-defined]
    assert error["code"] == "unauthorized"
    assert error["type"] == "authentication_error"
    assert not any(token in response.text for token in TOKENS)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("wrong"),
        bearer(TOKENS[0][:-1]),
        bearer(TOKENS[0] + "x"),
        bearer(""),
        {"Authorization": TOKENS[0]},
        {"Authorization": f"Basic {TOKENS[0]}"},
        {"Authorization": f"Token {TOKENS[0]}"},
        bearer(f"{TOKENS[0]},{TOKENS[1]}"),
        {b"Authorization": "Bearer é\u00ff".encode("latin-1")},
    ],
    ids=["none", "wrong", "prefix", "longer", "empty", "no-scheme", "basic", "token", "both", "latin-1"],
)
def test_the_api_answers_401_without_a_valid_token(
    client: Client, headers: Mapping[str, str] | Mapping[bytes, bytes]
) -> None:
    served = images_served(client)
    assert_unauthorized(client.post("/v1/embeddings", json={"input": ["album/1/a.jpg"]}, headers=headers))
    assert_unauthorized(client.get("/v1/models", headers=headers))
    files = [("files", ("a.jpg", photo_bytes("album/1/a.jpg"), "image/jpeg"))]
    assert_unauthorized(client.post("/v1/embeddings/upload", files=files, headers=headers))
    # nothing was embedded for a refused request
    assert images_served(client) == served


@pytest.mark.parametrize("token", TOKENS)
def test_any_configured_token_opens_every_api_route(client: Client, token: str) -> None:
    served = images_served(client)
    response = client.post("/v1/embeddings", json={"input": ["album/1/a.jpg"]}, headers=bearer(token))
    assert response.status_code == 200
    assert [d["index"] for d in response.json()["data"]] == [0]
    assert images_served(client) == served + 1
    assert client.get("/v1/models", headers=bearer(token)).status_code == 200
    files = [("files", ("a.jpg", photo_bytes("album/1/a.jpg"), "image/jpeg"))]
    assert client.post("/v1/embeddings/upload", files=files, headers=bearer(token)).status_code == 200
    # the scheme is case-insensitive (RFC 7235)
    lower = {"Authorization": f"bearer {token}"}
    assert client.get("/v1/models", headers=lower).status_code == 200


def test_probes_and_metrics_need_no_token(client: Client) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert "cliplens_images_total" in metrics.text


def test_the_comparison_checks_every_token_on_equal_length_digests(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit on the first match or mismatch, and no length to compare: the time taken says
    nothing about how close a guess was, or which token it matched."""
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)  # what cliplens.api.auth calls
    tokens = ("a", "b" * 100, "c" * 5)
    for presented, expected in (
        ("a", True),
        ("c" * 5, True),
        ("nope", False),
        ("", False),
        ("b" * 99, False),
    ):
        calls.clear()
        assert auth.token_matches(presented, tokens) is expected
        assert len(calls) == len(tokens)
        assert set(calls) == {(32, 32)}


def test_the_openai_client_works_with_the_token_as_its_api_key(secured: Settings) -> None:
    with InProcessService(secured) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key=TOKENS[1], max_retries=0)
        model = client.models.list().data[0].id
        result = client.embeddings.create(
            model=model, input=["album/1/a.jpg"], extra_body={"modality": "image"}
        )
        assert len(result.data) == 1 and len(result.data[0].embedding) == 32
        refused = OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            refused.embeddings.create(model=model, input=["album/1/a.jpg"], extra_body={"modality": "image"})
        assert caught.value.status_code == 401
