"""The embedding cache in the running service: real fake-gcs-server, real files, real Redis."""

from __future__ import annotations

import base64
import dataclasses
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from litestar import Litestar
from litestar.testing import TestClient

from cliplens.experiment.corpus import distinct_copy
from cliplens.pipeline.cache import VECTOR_FORMAT
from cliplens.settings import Settings
from cliplens.vocabulary import Stage
from tests.conftest import BUCKET, photo_bytes, running
from tests.harness.servers import FakeGcs, RedisServer
from tests.harness.service import Service, log_problems, serving, wait_for
from tests.integration.test_telemetry import samples, server_timing, value

Client = TestClient[Litestar]


Vectors = list[Any]
"""One vector per input (np.ndarray), None where the item failed."""


def embed(client: Client | httpx.Client, inputs: list[str], **body: object) -> tuple[httpx.Response, Vectors]:
    response = client.post("/v1/embeddings", json={"input": inputs, **body})
    assert response.status_code == 200, response.text
    payload = response.json()
    found = {d["index"]: np.asarray(d["embedding"], dtype=np.float32) for d in payload["data"]}
    return response, [found.get(index) for index in range(len(inputs))]


def hits(response: httpx.Response) -> int:
    return int(response.headers["x-cache-hits"])


def data_uri(data: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


def test_a_repeated_gcs_photo_is_served_from_its_generation_and_an_overwrite_is_never_stale(
    gcs_settings: Settings, fake_gcs: FakeGcs
) -> None:
    name = "cache/overwritten.jpg"
    fake_gcs.upload(BUCKET, name, photo_bytes("album/1/a.jpg"))
    with running(gcs_settings) as client:
        first, [old] = embed(client, [name])
        again, [cached] = embed(client, [name])
        before = samples(client.get("/metrics").text)
        fake_gcs.upload(BUCKET, name, photo_bytes("album/1/b.jpg"))
        overwritten, [new] = embed(client, [name])
        _, [expected] = embed(client, ["album/1/b.jpg"], cache=False)
        fake_gcs.delete(BUCKET, name)
        deleted = client.post("/v1/embeddings", json={"input": [name]})
        after = samples(client.get("/metrics").text)

    assert (hits(first), hits(again), hits(overwritten)) == (0, 1, 0)
    assert np.array_equal(cached, old), "a hit is the very vector the miss made"
    timing = server_timing(again.headers["server-timing"])
    assert set(timing) == {Stage.CACHE, "total"}, "a hit crosses no other stage"
    assert Stage.LOAD in server_timing(first.headers["server-timing"])

    assert np.array_equal(new, expected), "the overwritten object's new bytes, embedded"
    assert not np.allclose(new, old)
    assert deleted.json()["errors"][0]["code"] == "not_found"
    assert hits(deleted) == 0 and deleted.json()["data"] == []

    assert value(before, "cliplens_images_total", outcome="ok") == 2, "hits still count as images"
    assert value(before, "cliplens_image_stage_seconds_count", stage="load") == 1
    assert value(before, "cliplens_image_stage_seconds_count", stage="cache") == 2
    assert value(before, "cliplens_cache_requests_total", tier="memory", result="hit") == 1
    assert value(before, "cliplens_cache_requests_total", tier="memory", result="miss") == 1
    assert value(after, "cliplens_images_total", outcome="not_found") == 1
    # both generations of the name, and b.jpg (written though its request skipped lookups)
    assert value(after, "cliplens_cache_entries") == 3


def test_local_files_inline_bytes_and_texts_hit_and_a_request_can_skip_lookups(
    settings: Settings, photo_dir: Path, tmp_path: Path
) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    (root / "edited.jpg").write_bytes(photo_bytes("album/1/a.jpg"))
    (root / "other.jpg").write_bytes(photo_bytes("album/2/c.jpg"))
    inline = data_uri(photo_bytes("album/1/b.jpg"))
    texts = ["a dog on a beach", "a birthday cake"]
    with running(dataclasses.replace(settings, image_root=root)) as client:
        _, first = embed(client, ["edited.jpg", inline, "other.jpg"])
        repeated, second = embed(client, ["edited.jpg", inline, "other.jpg", "missing.jpg"])
        (root / "edited.jpg").write_bytes(photo_bytes("album/1/b.jpg"))
        edited, [new, from_bytes] = embed(client, ["edited.jpg", inline])
        skipped, _ = embed(client, ["other.jpg", inline], cache=False)
        text_first, text_vectors = embed(client, texts, modality="text")
        text_again, text_cached = embed(client, [texts[1], "a new caption", texts[0]], modality="text")
        models = client.get("/v1/models").json()["data"][0]
        found = samples(client.get("/metrics").text)

    assert hits(repeated) == 3 and second[3] is None
    for made, cached in zip(first, second[:3], strict=True):
        assert np.array_equal(made, cached)
    assert hits(edited) == 1, "the edited file is new (size, mtime); the inline bytes are not"
    assert np.array_equal(new, from_bytes), "the edited file now holds the inline photo's bytes"
    assert Stage.LOAD in server_timing(repeated.headers["server-timing"]), "inline bytes load before lookup"
    assert hits(skipped) == 0
    assert value(found, "cliplens_cache_requests_total", tier="memory", result="bypass") == 2

    assert (hits(text_first), hits(text_again)) == (0, 2)
    assert np.array_equal(text_cached[0], text_vectors[1]) and np.array_equal(text_cached[2], text_vectors[0])
    assert value(found, "cliplens_texts_total") == 5, "cached texts count too"

    assert models["cache"]["tiers"] == ["memory"]
    assert models["cache"]["memory_bytes"] == settings.cache_bytes
    assert models["cache"]["shared_url"] is None
    assert 0 < value(found, "cliplens_cache_bytes") <= value(found, "cliplens_cache_capacity_bytes")


def test_without_a_cache_there_is_no_lookup_and_no_header(settings: Settings) -> None:
    with running(dataclasses.replace(settings, cache_bytes=0)) as client:
        embed(client, ["album/1/a.jpg"])
        response, _ = embed(client, ["album/1/a.jpg"])
        models = client.get("/v1/models").json()["data"][0]
        found = samples(client.get("/metrics").text)
    assert "x-cache-hits" not in response.headers
    assert Stage.CACHE not in server_timing(response.headers["server-timing"])
    assert models["cache"] is None
    assert value(found, "cliplens_image_stage_seconds_count", stage="load") == 2
    assert value(found, "cliplens_cache_requests_total", tier="memory", result="miss") == 0


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis.log").start()
    yield server
    server.stop()


def shared(
    tiny_weights: Path, tmp_path: Path, photo_dir: Path, redis_server: RedisServer
) -> AbstractContextManager[Service]:
    """A `cliplens serve` process on the same checkpoint and photos, sharing the Redis tier only."""
    return serving(
        f"local-dir:{tiny_weights}",
        tmp_path,
        CLIPLENS_IMAGE_ROOT=str(photo_dir),
        CLIPLENS_CACHE_BYTES="0",
        CLIPLENS_CACHE_URL=redis_server.url,
        CLIPLENS_CACHE_TIMEOUT_MS="200",
    )


def test_two_processes_share_hits_through_redis(
    tiny_weights: Path, tmp_path: Path, photo_dir: Path, redis_server: RedisServer
) -> None:
    inputs = ["album/1/a.jpg", "album/1/b.jpg", "album/2/c.jpg"]
    with (
        shared(tiny_weights, tmp_path, photo_dir, redis_server) as first,
        shared(tiny_weights, tmp_path, photo_dir, redis_server) as second,
        httpx.Client(base_url=first.url, timeout=60) as one,
        httpx.Client(base_url=second.url, timeout=60) as other,
    ):
        made_here, made = embed(one, inputs)
        wait_for(lambda: first.metric("cliplens_cache_writes_total", tier="redis", result="ok") == 3)
        served_there, served = embed(other, inputs)
        assert (hits(made_here), hits(served_there)) == (0, 3)
        for a, b in zip(made, served, strict=True):
            assert np.array_equal(a, b)
        assert second.metric("cliplens_cache_requests_total", tier="redis", result="hit") == 3
        assert second.metric("cliplens_image_stage_seconds_count", stage="load") == 0
        card = other.get("/v1/models").json()["data"][0]["cache"]
        assert card["tiers"] == ["redis"] and card["shared_url"] == redis_server.url
        assert len(redis_server.keys(f"cliplens:v{VECTOR_FORMAT}:*")) == 3


def test_a_cache_outage_costs_no_request_and_the_circuit_closes_when_it_returns(
    tiny_weights: Path, tmp_path: Path, photo_dir: Path, redis_server: RedisServer
) -> None:
    photos = [photo_bytes(name) for name in ("album/1/a.jpg", "album/1/b.jpg", "album/2/c.jpg")]
    failures: list[str] = []
    answered = [0]
    stop = threading.Event()

    def load(url: str) -> None:
        """Requests of a new photo (a distinct copy) and a repeated local one."""
        with httpx.Client(base_url=url, timeout=60) as client:
            number = 0
            while not stop.is_set():
                number += 1
                inputs = [data_uri(distinct_copy(photos[number % 3], number)), "album/1/a.jpg"]
                response = client.post("/v1/embeddings", json={"input": inputs})
                body = response.json()
                if response.status_code != 200 or body.get("errors") or len(body["data"]) != 2:
                    failures.append(response.text[:300])
                answered[0] += 1

    with shared(tiny_weights, tmp_path, photo_dir, redis_server) as service:
        sender = threading.Thread(target=load, args=(service.url,))
        sender.start()
        try:
            wait_for(lambda: service.metric("cliplens_cache_requests_total", tier="redis", result="hit") > 2)
            redis_server.stop()
            wait_for(lambda: service.metric("cliplens_cache_circuit_open", tier="redis") == 1)
            during = answered[0]
            wait_for(lambda: answered[0] > during + 5)
            assert service.metric("cliplens_cache_requests_total", tier="redis", result="bypass") > 0
            redis_server.start()
            wait_for(lambda: service.metric("cliplens_cache_circuit_open", tier="redis") == 0, 30)
            hits_back = service.metric("cliplens_cache_requests_total", tier="redis", result="hit")
            shared_hits = {"tier": "redis", "result": "hit"}
            wait_for(lambda: service.metric("cliplens_cache_requests_total", **shared_hits) > hits_back)
        finally:
            stop.set()
            sender.join(60)
        errors = service.metric("cliplens_cache_requests_total", tier="redis", result="error")
        write_errors = service.metric("cliplens_cache_writes_total", tier="redis", result="error")
    assert failures == [], "a cache outage never fails a request"
    assert errors + write_errors >= 5, "the failures that opened the circuit are counted"
    assert log_problems(service) == []
    assert "shared cache bypassed" in service.log.read_text(), "the outage is logged as a warning"
