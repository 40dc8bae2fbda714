"""What browser and OpenAI-style clients expect of the HTTP edge: CORS for the origins allowed,
gzip when asked for and enabled, and a served model name (alias) that `model` and
`models.retrieve` accept."""

from __future__ import annotations

import dataclasses

import openai
import pytest
from openai import OpenAI

from cliplens.experiment.inprocess import InProcessService
from cliplens.settings import Settings
from tests.conftest import running

ORIGIN = "https://photos.example"
PHOTOS = ["album/1/a.jpg", "album/1/b.jpg", "album/2/c.jpg"]


def test_cors_preflight_and_response_headers_for_an_allowed_origin_only(settings: Settings) -> None:
    cors = dataclasses.replace(settings, cors_origins=(ORIGIN,), api_tokens=("s3cret",))
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    with running(cors) as client:
        allowed = client.options("/v1/embeddings", headers={"Origin": ORIGIN, **preflight})
        refused = client.options("/v1/embeddings", headers={"Origin": "https://evil.example", **preflight})
        answer = client.post(
            "/v1/embeddings",
            json={"input": PHOTOS[:1]},
            headers={"Origin": ORIGIN, "Authorization": "Bearer s3cret"},
        )
    assert allowed.status_code == 204, allowed.text  # before the token check: a preflight has none
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-origin" not in refused.headers
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ORIGIN
    exposed = answer.headers["access-control-expose-headers"].lower()
    assert "x-trace-id" in exposed and "server-timing" in exposed


def test_without_cors_origins_no_cors_headers_are_sent(settings: Settings) -> None:
    with running(settings) as client:
        answer = client.post("/v1/embeddings", json={"input": PHOTOS[:1]}, headers={"Origin": ORIGIN})
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers


@pytest.mark.parametrize("gzip_min_bytes", [0, 1024])
def test_gzip_when_enabled_and_accepted_with_the_same_body(settings: Settings, gzip_min_bytes: int) -> None:
    with running(dataclasses.replace(settings, gzip_min_bytes=gzip_min_bytes)) as client:
        body = {"input": PHOTOS, "cache": False}
        gzipped = client.post("/v1/embeddings", json=body, headers={"Accept-Encoding": "gzip"})
        plain = client.post("/v1/embeddings", json=body, headers={"Accept-Encoding": "identity"})
    assert gzipped.headers.get("content-encoding") == ("gzip" if gzip_min_bytes else None)
    assert "content-encoding" not in plain.headers
    assert gzipped.json()["data"] == plain.json()["data"]  # httpx inflates it; random weights, same vectors


def test_a_served_model_name_is_listed_accepted_and_retrieved_by_the_openai_client(
    settings: Settings,
) -> None:
    aliased = dataclasses.replace(settings, served_model_name="photo-clip")
    with InProcessService(aliased) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        (listed,) = client.models.list().data
        assert listed.id == "photo-clip"
        own_id = listed.model_extra["model_id"] if listed.model_extra else None
        assert own_id and own_id != "photo-clip"
        assert client.models.retrieve("photo-clip").id == "photo-clip"
        result = client.embeddings.create(model="photo-clip", input=PHOTOS[:1])
        assert result.model == "photo-clip" and len(result.data) == 1
        assert len(client.embeddings.create(model=own_id, input=PHOTOS[:1]).data) == 1  # its own id too
        with pytest.raises(openai.NotFoundError) as caught:
            client.embeddings.create(model="gpt-4", input=PHOTOS[:1])
        assert caught.value.status_code == 404
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("gpt-4")
