"""Storage faults end in the documented item code or a successful retry, and leak nothing.

Two storages: the fault-injecting stand-in (tests/harness/faulty_gcs.py), which scripts each object's
misbehaviour, and the real fake-gcs-server, stopped and restarted under a running service.
Timeouts and the byte cap are shrunk in the settings so that every fault resolves in about a second.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from litestar import Litestar
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from cliplens.experiment.corpus import encode_jpeg, render_photo
from cliplens.experiment.inprocess import free_port
from cliplens.pipeline.references import GcsReference
from cliplens.pipeline.sources import GcsSource
from cliplens.settings import Settings
from tests.conftest import PARTIAL, running
from tests.harness.faulty_gcs import Endless, FaultyGcs, Reset, Serve, Status, Trickle, gzip_bomb
from tests.harness.servers import FakeGcs, child_environment

Client = TestClient[Litestar]
BUCKET = "photos"
CAP = 512 * 1024
"""The byte cap of these tests; the photos are 60-150 kB, the oversized objects 4x the cap."""

PHOTO_A = encode_jpeg(render_photo(21, 800, 600))
PHOTO_B = encode_jpeg(render_photo(22, 640, 480))
PHOTO_C = encode_jpeg(render_photo(23, 1024, 768))
BOMB = gzip_bomb(64 * 1024 * 1024)
"""64 MiB of zeros, about 64 kB gzip-encoded: its stored size passes the cap, its decoded size does not."""


def settings_for(tiny_model: str, url: str, **changes: object) -> Settings:
    base = Settings(
        model=tiny_model,
        pretrained="none",
        default_bucket=BUCKET,
        allowed_buckets=(BUCKET,),
        gcs_emulator_host=url,
        cpu_workers=2,
        max_inputs=32,
        max_image_bytes=CAP,
        on_error=PARTIAL,
        request_timeout_s=3.0,
        download_timeout_s=0.5,
        download_retries=3,
        # the stand-in serves downloads only (no object metadata), and these tests count them:
        # the cache's metadata lookups are tested against fake-gcs-server (test_cache.py)
        cache_bytes=0,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def gcs() -> Iterator[FaultyGcs]:
    with FaultyGcs() as server:
        yield server


def metric(client: Client, name: str, **labels: str) -> float:
    """One sample of the real /metrics text (0 when the series does not exist)."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def embed(client: Client, inputs: list[str]) -> dict[str, object]:
    response = client.post("/v1/embeddings", json={"input": inputs})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def codes(body: dict[str, object]) -> dict[int, str]:
    """{index: code} of every item, "ok" for the ones that came back with a vector."""
    out = {int(d["index"]): "ok" for d in body["data"]}  # type: ignore[attr-defined]
    out.update({int(e["index"]): e["code"] for e in body["errors"]})  # type: ignore[attr-defined]
    return out


def vectors(body: dict[str, object]) -> dict[int, np.ndarray]:
    return {
        int(d["index"]): np.asarray(d["embedding"], dtype=np.float32)
        for d in body["data"]  # type: ignore[attr-defined]
    }


def alone(client: Client, gcs: FaultyGcs, photo: bytes) -> np.ndarray:
    """The vector of `photo` sent alone, through the same storage path."""
    name = f"reference/{hash(photo)}.jpg"
    gcs.put(BUCKET, name, Serve(photo))
    return vectors(embed(client, [name]))[0]


FAULTS: list[tuple[str, tuple[object, ...], str, int]] = [
    # name, script, expected item code, requests the stand-in must have seen
    ("good/a.jpg", (Serve(PHOTO_A),), "ok", 1),
    ("flaky/429.jpg", (Status(429, retry_after="1"), Serve(PHOTO_B)), "ok", 2),
    ("flaky/503.jpg", (Status(503), Status(503), Serve(PHOTO_C)), "ok", 3),
    ("flaky/reset.jpg", (Reset(PHOTO_A), Serve(PHOTO_A)), "ok", 2),
    ("gzip/c.jpg", (Serve(__import__("gzip").compress(PHOTO_C), encoding="gzip"),), "ok", 1),
    ("big/sized.jpg", (Serve(b"\xff\xd8\xff" + b"\0" * (4 * CAP)),), "too_large", 1),
    ("big/unsized.jpg", (Endless(),), "too_large", 1),
    ("big/gzip-bomb.jpg", (Serve(BOMB, encoding="gzip"),), "too_large", 1),
    ("denied.jpg", (Status(403),), "forbidden", 1),
    ("missing.jpg", (Status(404),), "not_found", 1),
    ("down.jpg", (Status(503),), "storage_unavailable", 4),
    ("down/endless-error-page.jpg", (Status(503, endless=True),), "storage_unavailable", 4),
]
EXPECTED_VECTOR = {"good/a.jpg": PHOTO_A, "flaky/429.jpg": PHOTO_B, "flaky/503.jpg": PHOTO_C}
EXPECTED_VECTOR |= {"flaky/reset.jpg": PHOTO_A, "gzip/c.jpg": PHOTO_C}


def script(gcs: FaultyGcs) -> list[str]:
    for name, steps, _, _ in FAULTS:
        gcs.put(BUCKET, name, *steps)  # type: ignore[arg-type]
    return [name for name, _, _, _ in FAULTS]


def test_every_storage_fault_ends_in_its_code_or_a_successful_retry(tiny_model: str, gcs: FaultyGcs) -> None:
    with running(settings_for(tiny_model, gcs.url)) as client:
        expected = {photo: alone(client, gcs, photo) for photo in (PHOTO_A, PHOTO_B, PHOTO_C)}
        gcs.reset_counts()
        names = script(gcs)
        # a slow trickle: each attempt passes the 0.5 s download timeout, and is retried in the deadline
        gcs.put(BUCKET, "slow/trickle.jpg", Trickle(PHOTO_A, chunk=1024, interval_s=0.05))
        names.append("slow/trickle.jpg")
        started = time.monotonic()
        body = embed(client, names)
        elapsed = time.monotonic() - started

        got = codes(body)
        assert {names[i]: code for i, code in got.items()} == {
            **{name: code for name, _, code, _ in FAULTS},
            "slow/trickle.jpg": "timeout",
        }
        for name, _, _, requested in FAULTS:
            assert gcs.count(BUCKET, name) == requested, name
        for index, vector in vectors(body).items():
            np.testing.assert_allclose(vector, expected[EXPECTED_VECTOR[names[index]]], atol=1e-5)
        # what the stand-in could send before the service hung up: the cap (or a little of an error
        # page), plus what the socket buffers hold; never the endless rest
        assert gcs.endless_bytes[f"{BUCKET}/big/unsized.jpg"] < CAP + 8 * 1024 * 1024
        assert gcs.endless_bytes[f"{BUCKET}/down/endless-error-page.jpg"] < 4 * 8 * 1024 * 1024
        arrivals = gcs.arrivals[f"{BUCKET}/flaky/429.jpg"]
        assert arrivals[1] - arrivals[0] >= 1.0, "Retry-After: 1 was not honoured"
        assert elapsed < 3.0 + 1.0, "the response must come back by the request deadline"

        retries = {
            reason: metric(client, "cliplens_download_retries_total", reason=reason)
            for reason in ("http_429", "http_5xx", "connection", "timeout")
        }
        assert retries["http_429"] == 1
        assert retries["http_5xx"] == 2 + 3 + 3  # flaky/503 twice, the two down/ on each of 3 retries
        assert retries["connection"] == 1
        assert retries["timeout"] >= 1
        assert gcs.count(BUCKET, "slow/trickle.jpg") == retries["timeout"] + 1
        for code in ("too_large", "forbidden", "not_found", "storage_unavailable", "timeout"):
            expected_count = sum(1 for c in got.values() if c == code)
            assert metric(client, "cliplens_images_total", outcome=code) == expected_count, code
        assert client.get("/healthz").status_code == 200


def test_the_request_deadline_returns_the_rest_and_counts_the_timeout(
    tiny_model: str, gcs: FaultyGcs
) -> None:
    settings = settings_for(tiny_model, gcs.url, request_timeout_s=1.0, download_timeout_s=30.0)
    gcs.put(BUCKET, "good/a.jpg", Serve(PHOTO_A))
    gcs.put(BUCKET, "slow/trickle.jpg", Trickle(PHOTO_B, chunk=512, interval_s=0.05))
    with running(settings) as client:
        reference = alone(client, gcs, PHOTO_A)
        started = time.monotonic()
        body = embed(client, ["good/a.jpg", "slow/trickle.jpg", "good/a.jpg"])
        elapsed = time.monotonic() - started
        assert codes(body) == {0: "ok", 1: "timeout", 2: "ok"}
        assert "deadline" in body["errors"][0]["message"]  # type: ignore[index]
        assert 1.0 <= elapsed < 3.0, "the item waited for its own (30 s) download timeout"
        for vector in vectors(body).values():
            np.testing.assert_allclose(vector, reference, atol=1e-5)
        assert metric(client, "cliplens_images_total", outcome="timeout") == 1
        assert metric(client, "cliplens_download_retries_total", reason="timeout") == 0
        assert metric(client, "cliplens_images_in_flight") == 0
        assert metric(client, "cliplens_requests_in_flight") == 0


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_faults_leak_neither_file_descriptors_nor_tasks(tiny_model: str, gcs: FaultyGcs) -> None:
    settings = settings_for(tiny_model, gcs.url, request_timeout_s=1.5, download_timeout_s=0.3)
    with running(settings) as client:

        def one_round() -> None:
            names = script(gcs)
            # Retry-After 0: no need to wait a second per round here
            gcs.put(BUCKET, "flaky/429.jpg", Status(429, retry_after="0"), Serve(PHOTO_B))
            gcs.put(BUCKET, "slow/trickle.jpg", Trickle(PHOTO_A, chunk=1024, interval_s=0.05))
            body = embed(client, [*names, "slow/trickle.jpg"])
            assert sorted(codes(body).values()).count("ok") == 5

        def tasks() -> int:
            return client.blocking_portal.call(lambda: len(asyncio.all_tasks()))

        one_round()
        time.sleep(0.2)
        fds, task_count = open_fds(), tasks()
        for _ in range(4):
            one_round()
        time.sleep(0.2)
        # keep-alive connections to the stand-in are pooled (both ends are in this process), so
        # the count may differ by a connection or two; a leak per fault would add 5+ per round
        assert open_fds() <= fds + 4, (fds, open_fds())
        assert tasks() == task_count


@pytest.fixture
def own_fake_gcs(tmp_path: Path) -> Iterator[FakeGcs]:
    server = FakeGcs(tmp_path / "fake-gcs.log", port=free_port()).start()
    yield server
    server.stop()


def fill(server: FakeGcs) -> None:
    server.create_bucket(BUCKET)
    server.upload(BUCKET, "album/a.jpg", PHOTO_A)


def test_the_service_recovers_by_itself_when_the_real_fake_gcs_server_comes_back(
    tiny_model: str, own_fake_gcs: FakeGcs, tmp_path: Path
) -> None:
    fill(own_fake_gcs)
    settings = settings_for(tiny_model, own_fake_gcs.url, download_timeout_s=0.5, download_retries=2)
    with running(settings) as client:
        before = embed(client, ["album/a.jpg"])
        assert codes(before) == {0: "ok"}

        own_fake_gcs.stop()
        started = time.monotonic()
        down = embed(client, ["album/a.jpg", "album/a.jpg"])
        assert codes(down) == {0: "storage_unavailable", 1: "storage_unavailable"}
        assert time.monotonic() - started < 3.0
        assert metric(client, "cliplens_download_retries_total", reason="connection") == 2 * 2
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200

        restarted = FakeGcs(tmp_path / "fake-gcs-2.log", port=own_fake_gcs.port).start()
        try:
            fill(restarted)
            after = embed(client, ["album/a.jpg"])
            assert codes(after) == {0: "ok"}
            np.testing.assert_allclose(vectors(after)[0], vectors(before)[0], atol=1e-5)
        finally:
            restarted.stop()


def test_an_emulator_host_in_the_environment_never_turns_off_authentication(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gcloud-aio reads STORAGE_EMULATOR_HOST itself and then drops tokens and TLS checks; the
    source passes the API root explicitly, so without an emulator in the settings it asks for a
    real token and never calls the host in the variable."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")
    requested: list[str] = []

    class Recording:
        """The session: records the first request, which then never answers."""

        async def get(self, url: str, **kwargs: object) -> None:
            requested.append(url)
            await asyncio.Event().wait()

        post = get

    source = GcsSource(Recording(), CAP, emulator_host=None, retries=0)  # type: ignore[arg-type]
    with pytest.raises(TimeoutError):
        asyncio.run(asyncio.wait_for(source.load(GcsReference(BUCKET, "a.jpg")), 0.5))
    assert len(requested) == 1 and "127.0.0.1:9" not in requested[0]
    assert "token" in requested[0], requested


def test_serve_refuses_to_start_with_an_emulator_host_unless_allowed(tiny_model: str) -> None:
    env = child_environment(
        CLIPLENS_MODEL=tiny_model,
        CLIPLENS_PRETRAINED="none",
        CLIPLENS_DEFAULT_BUCKET=BUCKET,
        STORAGE_EMULATOR_HOST="http://127.0.0.1:9",
    )
    result = subprocess.run(
        [sys.executable, "-m", "cliplens.cli", "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "STORAGE_EMULATOR_HOST" in result.stderr and "CLIPLENS_ALLOW_EMULATOR=1" in result.stderr
