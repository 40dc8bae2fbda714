"""Request fields that mean what they say: `on_error` (all or nothing, or indexed partial results),
`normalize` (unit vectors or the raw projection) and `truncate` (texts over the model's context are
refused with their token count, or cut and reported), through the official openai client where an
OpenAI-style client is the point."""

from __future__ import annotations

import base64
import dataclasses

import numpy as np
import openai
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from openai import OpenAI

from cliplens.experiment.inprocess import InProcessService
from cliplens.settings import Settings
from tests.conftest import photo_bytes, running

PHOTOS = ["album/1/a.jpg", "album/1/b.jpg", "album/2/c.jpg"]
WITH_MISSING = [PHOTOS[0], "missing.jpg", PHOTOS[1]]
LONG_TEXT = " ".join(["photo"] * 200)  # 1,199 characters: under the cap, 202 tokens with start and end


@pytest.fixture
def strict(settings: Settings) -> Settings:
    """The deployment default: a request with a failed item fails whole."""
    assert Settings().on_error == "fail"
    return dataclasses.replace(settings, on_error=Settings().on_error)


def _vectors(body: dict[str, object]) -> dict[int, np.ndarray]:
    return {entry["index"]: np.asarray(entry["embedding"]) for entry in body["data"]}  # type: ignore[attr-defined]


def _openai(url: str) -> tuple[OpenAI, str]:
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    return client, client.models.list().data[0].id


def test_the_openai_client_gets_an_error_with_every_failed_item_by_default(strict: Settings) -> None:
    with InProcessService(strict) as url:
        client, model = _openai(url)
        with pytest.raises(openai.UnprocessableEntityError) as caught:
            client.embeddings.create(model=model, input=WITH_MISSING)
        with pytest.raises(openai.UnprocessableEntityError) as alone:
            client.embeddings.create(model=model, input=["missing.jpg"])
        complete = client.embeddings.create(model=model, input=PHOTOS)
    error = caught.value
    assert "1 of 3 items failed" in error.message and "on_error: partial" in error.message
    assert "on_error" not in alone.value.message  # no other item's vector to ask for
    assert error.status_code == 422 and error.code == "item_errors"
    assert isinstance(error.body, dict)
    assert [(e["index"], e["input"], e["code"]) for e in error.body["errors"]] == [
        (1, "missing.jpg", "not_found")
    ]
    assert error.response.headers["x-trace-id"] and "embed;dur=" in error.response.headers["server-timing"]
    # A zip over a complete answer pairs each input with its own vector: the only kind `fail` returns.
    assert [entry.index for entry in complete.data] == list(range(len(PHOTOS)))


def test_partial_keeps_indices_and_counts_the_failures(strict: Settings) -> None:
    with InProcessService(strict) as url:
        client, model = _openai(url)
        raw = client.embeddings.with_raw_response.create(
            model=model, input=WITH_MISSING, extra_body={"on_error": "partial"}
        )
        complete = client.embeddings.with_raw_response.create(
            model=model, input=PHOTOS, extra_body={"on_error": "partial"}
        )
        alone = client.embeddings.create(model=model, input=[PHOTOS[1]], extra_body={"on_error": "partial"})
    result = raw.parse()
    assert raw.headers["x-items-failed"] == "1" and complete.headers["x-items-failed"] == "0"
    assert [entry.index for entry in result.data] == [0, 2]
    assert result.model_extra and [e["code"] for e in result.model_extra["errors"]] == ["not_found"]
    # The vector at index 2 is photo b's, not the one a zip over `data` would give input 1.
    assert np.allclose(result.data[1].embedding, alone.data[0].embedding, atol=1e-6)


def test_the_deployment_default_and_the_upload_route_follow_on_error(strict: Settings) -> None:
    files = [("files", ("a.jpg", photo_bytes(PHOTOS[0]))), ("files", ("bad.jpg", b"not an image"))]
    with running(dataclasses.replace(strict, on_error="partial")) as client:
        default = client.post("/v1/embeddings", json={"input": WITH_MISSING})
        asked = client.post("/v1/embeddings", json={"input": WITH_MISSING, "on_error": "fail"})
        upload_default = client.post("/v1/embeddings/upload", files=files)
    with running(strict) as client:
        upload_fail = client.post("/v1/embeddings/upload", files=files)
        upload_partial = client.post("/v1/embeddings/upload", files=files, data={"on_error": "partial"})
        unknown = client.post("/v1/embeddings/upload", files=files, data={"on_error": "maybe"})
        refused = client.post("/v1/embeddings", json={"input": PHOTOS, "on_error": "maybe"})
    assert default.status_code == 200 and len(default.json()["data"]) == 2
    assert asked.status_code == 422 and asked.json()["error"]["code"] == "item_errors"
    assert upload_default.status_code == 200 and upload_default.headers["x-items-failed"] == "1"
    assert upload_fail.status_code == 422
    assert [e["input"] for e in upload_fail.json()["error"]["errors"]] == ["bad.jpg"]
    assert upload_partial.status_code == 200 and [d["index"] for d in upload_partial.json()["data"]] == [0]
    assert unknown.status_code == 400 and "on_error" in unknown.json()["error"]["message"]
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_body"


@pytest.mark.parametrize("modality,items", [("image", PHOTOS[:2]), ("text", ["a dog", "two cats on a sofa"])])
def test_normalize_false_returns_the_raw_projection_in_the_same_direction(
    client: TestClient[Litestar], modality: str, items: list[str]
) -> None:
    unit = client.post("/v1/embeddings", json={"input": items, "modality": modality})
    raw = client.post("/v1/embeddings", json={"input": items, "modality": modality, "normalize": False})
    raw_b64 = client.post(
        "/v1/embeddings",
        json={"input": items, "modality": modality, "normalize": False, "encoding_format": "base64"},
    )
    assert unit.status_code == raw.status_code == raw_b64.status_code == 200
    units, raws = _vectors(unit.json()), _vectors(raw.json())
    for index in units:
        norm = float(np.linalg.norm(raws[index]))
        assert np.isclose(np.linalg.norm(units[index]), 1.0, atol=1e-5)
        assert not np.isclose(norm, 1.0, atol=1e-3)
        assert np.allclose(raws[index] / norm, units[index], atol=1e-5)
        decoded = np.frombuffer(base64.b64decode(raw_b64.json()["data"][index]["embedding"]), "<f4")
        assert np.allclose(decoded, raws[index], atol=1e-6)


def test_normalize_false_is_served_from_the_cache_from_the_same_vector(client: TestClient[Litestar]) -> None:
    made = client.post("/v1/embeddings", json={"input": PHOTOS[2:], "normalize": False, "cache": False})
    hit = client.post("/v1/embeddings", json={"input": PHOTOS[2:], "normalize": False})
    unit = client.post("/v1/embeddings", json={"input": PHOTOS[2:]})
    assert hit.headers["x-cache-hits"] == unit.headers["x-cache-hits"] == "1"
    assert np.array_equal(_vectors(made.json())[0], _vectors(hit.json())[0])
    raw = _vectors(hit.json())[0]
    assert np.allclose(raw / np.linalg.norm(raw), _vectors(unit.json())[0], atol=1e-6)


def test_a_text_over_the_context_is_refused_with_its_token_count(client: TestClient[Litestar]) -> None:
    answer = client.post("/v1/embeddings", json={"input": ["a dog", LONG_TEXT], "modality": "text"})
    body = answer.json()
    assert answer.status_code == 200 and [d["index"] for d in body["data"]] == [0]
    (error,) = body["errors"]
    assert error["index"] == 1 and error["code"] == "text_too_long"
    assert "202 tokens" in error["message"] and "77" in error["message"]
    assert body["truncated"] == []


def test_truncate_cuts_to_the_context_and_says_which_inputs_were_cut(client: TestClient[Litestar]) -> None:
    words = LONG_TEXT.split()
    fits = " ".join(words[:75])  # 75 words + start + end = the 77-token context exactly
    cut = client.post(
        "/v1/embeddings", json={"input": ["a dog", LONG_TEXT, fits], "modality": "text", "truncate": True}
    ).json()
    exact = client.post("/v1/embeddings", json={"input": [fits], "modality": "text"}).json()
    assert cut["errors"] == [] and cut["truncated"] == [1]
    vectors = _vectors(cut)
    assert np.allclose(vectors[1], vectors[2], atol=1e-5)  # cut to its first 75 words, as `fits` is
    assert np.allclose(vectors[2], _vectors(exact)[0], atol=1e-6)
    assert cut["usage"]["prompt_tokens"] == 4 + 77 + 77  # "a dog" is 2 words + start + end


def test_user_is_accepted_and_ignored(client: TestClient[Litestar]) -> None:
    """OpenAI's `user` (an end-user id for abuse monitoring) changes nothing: not refused, not echoed,
    not part of what is embedded."""
    plain = client.post("/v1/embeddings", json={"input": PHOTOS[:2], "cache": False})
    tagged = client.post("/v1/embeddings", json={"input": PHOTOS[:2], "cache": False, "user": "user-1234"})
    assert plain.status_code == tagged.status_code == 200
    assert "user-1234" not in tagged.text
    assert tagged.json()["usage"] == plain.json()["usage"]
    vectors, tagged_vectors = _vectors(plain.json()), _vectors(tagged.json())
    assert sorted(tagged_vectors) == sorted(vectors) == [0, 1]
    for index, vector in vectors.items():
        assert np.allclose(tagged_vectors[index], vector, atol=1e-6)
