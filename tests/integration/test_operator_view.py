"""The operator's view: every HTTP response counted, server spans named by route template, the
event loop's lag, the pools' threads, the storage checks and the `internal` item code.

Each test drives the real app (Litestar + the OpenTelemetry middleware + the real exporters) and
reads what an operator would read: the `/metrics` text, the spans an OTLP receiver got, `/readyz`.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from litestar.testing import TestClient
from prometheus_client.parser import text_string_to_metric_families

from cliplens.app import create_app
from cliplens.pipeline.service import EmbeddingService
from cliplens.settings import Settings
from tests.conftest import running
from tests.harness.servers import HttpOtlpReceiver

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
ROUTE = "/v1/embeddings"


def samples(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def series(found: Samples, name: str, **labels: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return {key: value for (sample, key), value in found.items() if sample == name and wanted <= set(key)}


@pytest.fixture
def receiver() -> Iterator[HttpOtlpReceiver]:
    server = HttpOtlpReceiver()
    server.start()
    yield server
    server.stop()


def test_every_response_is_counted_by_method_route_and_status(settings: Settings) -> None:
    """A known mix of 200/400/401/404/413/422/429: `http_server_request_duration_seconds_count` has
    exactly that many of each, labelled with the route template; probes and /metrics are not counted."""
    guarded = dataclasses.replace(
        settings, api_tokens=("s3cret",), max_inputs=4, max_images_in_flight=4, max_downloads=1, cache_bytes=0
    )
    auth = {"Authorization": "Bearer s3cret"}
    photos = ["album/1/a.jpg", "album/1/b.jpg", "album/2/c.jpg"]
    sent: Counter[tuple[str, str, int]] = Counter()
    with running(guarded) as client:

        def post(body: object, headers: dict[str, str] = auth) -> None:
            response = client.post(ROUTE, json=body, headers=headers)
            sent["POST", ROUTE, response.status_code] += 1

        post({"input": photos[:2]})
        post({"input": photos[:1]}, headers={})
        post({"input": []})
        post({"input": photos + photos[:2]})
        response = client.post(ROUTE, content=b"{", headers={**auth, "Content-Type": "application/json"})
        sent["POST", ROUTE, response.status_code] += 1
        for path in ("/nope", "/wp-login.php", "/v1/embeddings/x"):
            sent["GET", "", client.get(path, headers=auth).status_code] += 1
        # 429: a request holds every admission slot while its downloads wait for the one download
        # slot, which the test holds; the next request is refused at once
        service: EmbeddingService = client.app.state.runtime.service
        with client.portal() as portal:
            portal.call(service.download_slots.acquire)
            holder = threading.Thread(target=post, args=({"input": photos + photos[:1]},))
            holder.start()
            deadline = time.monotonic() + 10
            while service.images_in_flight < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            post({"input": photos[:1]})
            portal.call(service.download_slots.release)
            holder.join()
        for probe in ("/healthz", "/readyz", "/metrics"):
            client.get(probe)
        found = samples(client.get("/metrics").text)

    assert {code for _, _, code in sent} == {200, 400, 401, 404, 413, 422, 429}, sent
    counted = {
        (
            dict(key)["http_request_method"],
            dict(key)["http_route"],
            int(dict(key)["http_response_status_code"]),
        ): value
        for key, value in series(found, "http_server_request_duration_seconds_count").items()
    }
    assert counted == dict(sent)
    assert not any(route in ("/healthz", "/readyz", "/metrics") for _, route, _ in counted)


def test_server_spans_are_named_by_route_template_and_unknown_paths_share_one_name(
    settings: Settings, receiver: HttpOtlpReceiver
) -> None:
    traced = dataclasses.replace(settings, otlp_endpoint=receiver.endpoint)
    probes = ["/admin/123", "/.env", "/v2/x/y/z"]
    with running(traced) as client:
        for path in probes:
            assert client.get(path).status_code == 404
        assert client.get("/v1/models").status_code == 200
        assert client.post(ROUTE, json={"input": ["album/1/a.jpg"]}).status_code == 200
    spans = receiver.store.wait_for(
        lambda got: sum(s.parent_span_id == "" and "GET" in s.name for s in got) >= 4
    )
    servers = [s for s in spans if s.parent_span_id == "" and "http.request.method" in s.attributes]
    names = Counter(s.name for s in servers)
    assert names == {"GET": len(probes), "GET /v1/models": 1, "POST /v1/embeddings": 1}
    for span in servers:  # the stable HTTP conventions, and no raw path in any name
        assert "http.method" not in span.attributes and "http.status_code" not in span.attributes
        assert "http.response.status_code" in span.attributes
        assert not any(path in span.name for path in probes)
        if span.name == "GET":
            assert "http.route" not in span.attributes
        else:
            assert span.attributes["http.route"] == span.name.split(" ", 1)[1]


def test_a_blocked_event_loop_shows_in_the_lag_histogram_its_exact_max_and_the_load_events(
    settings: Settings, receiver: HttpOtlpReceiver
) -> None:
    traced = dataclasses.replace(settings, otlp_endpoint=receiver.endpoint, cache_bytes=0, max_downloads=1)
    with running(traced) as client:
        with client.portal() as portal:
            portal.call(time.sleep, 0.3)  # the loop itself runs this: it is blocked for 300 ms
            stop = threading.Event()

            def block_the_loop_repeatedly() -> None:
                while not stop.is_set():
                    portal.call(time.sleep, 0.03)
                    time.sleep(0.005)

            blocker = threading.Thread(target=block_the_loop_repeatedly)
            blocker.start()
            try:
                response = client.post(
                    ROUTE, json={"input": ["album/1/a.jpg", "album/1/b.jpg", "album/2/c.jpg"] * 4}
                )
            finally:
                stop.set()
                blocker.join()
        found = samples(client.get("/metrics").text)
    assert response.status_code == 200
    assert found["cliplens_event_loop_lag_max_seconds", ()] >= 0.25
    count = found["cliplens_event_loop_lag_seconds_count", ()]
    below = max(
        value
        for (name, labels), value in found.items()
        if name == "cliplens_event_loop_lag_seconds_bucket" and float(dict(labels)["le"]) < 0.2
    )
    assert count - below >= 1  # the 300 ms stretch is one observation above 200 ms
    trace_id = response.headers["x-trace-id"]
    spans = receiver.store.wait_for(lambda got: any(s.name == "load" and s.trace_id == trace_id for s in got))
    load = next(s for s in spans if s.name == "load" and s.trace_id == trace_id)
    lags = [event[2].get("cliplens.image.loop_lag_ms") for event in load.events]
    assert any(isinstance(lag, float) and lag >= 5 for lag in lags), lags
    assert load.attributes["cliplens.loop_lag_ms"] == max(lag for lag in lags if isinstance(lag, float))


def test_threads_are_counted_by_pool_and_pool_busy_time_grows_with_work(settings: Settings) -> None:
    with running(dataclasses.replace(settings, cache_bytes=0)) as client:
        before = samples(client.get("/metrics").text)
        client.post(ROUTE, json={"input": ["album/1/a.jpg", "album/2/c.jpg"] * 4})
        after = samples(client.get("/metrics").text)
    threads = {dict(key)["pool"]: value for key, value in series(after, "cliplens_threads").items()}
    assert set(threads) == {"cpu", "text", "io", "model", "torch", "other"}
    assert threads["cpu"] == settings.cpu_workers and threads["model"] == 1
    assert threads["other"] >= 1  # the event loop's own thread at least
    workers = {dict(key)["pool"]: value for key, value in series(after, "cliplens_cpu_pool_workers").items()}
    assert workers["cpu"] == settings.cpu_workers and workers["model"] == workers["text"] == 1
    assert all(value == 0 for value in series(after, "cliplens_cpu_pool_queue").values())

    def busy(found: Samples, pool: str) -> float:
        return found["cliplens_cpu_pool_busy_seconds_total", (("pool", pool),)]

    assert busy(after, "cpu") > busy(before, "cpu") and busy(after, "model") > busy(before, "model")


def test_an_unexpected_failure_is_an_internal_item_error_and_the_others_are_embedded(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in one item's path (injected: the decoder raises what it never should) is `internal`,
    counted as such, and never `decode_failed`; the request's other items are embedded."""
    from cliplens.pipeline.decode import decode_image as real

    def buggy(data: bytes, *args: object) -> object:
        if len(data) == len(Path(settings.image_root or ".", "album/1/b.jpg").read_bytes()):
            raise KeyError("a bug")
        return real(data, *args)  # type: ignore[arg-type]

    monkeypatch.setattr("cliplens.pipeline.service.decode_image", buggy)
    with running(dataclasses.replace(settings, cache_bytes=0)) as client:
        body = client.post(ROUTE, json={"input": ["album/1/a.jpg", "album/1/b.jpg"]}).json()
        found = samples(client.get("/metrics").text)
    assert [item["index"] for item in body["data"]] == [0]
    assert [(e["index"], e["code"]) for e in body["errors"]] == [(1, "internal")]
    assert "KeyError" in body["errors"][0]["message"]
    assert found["cliplens_images_total", (("outcome", "internal"),)] == 1
    assert found["cliplens_images_total", (("outcome", "decode_failed"),)] == 0


def test_readyz_reports_the_storage_checks(settings: Settings) -> None:
    with running(settings) as client:
        body = client.get("/readyz").json()
        found = samples(client.get("/metrics").text)
    assert body["storage"]["local"]["up"] is True
    assert found["cliplens_storage_up", (("source", "local"),)] == 1


def test_an_unreachable_bucket_is_on_readyz_and_fails_it_when_storage_is_required(
    gcs_settings: Settings,
) -> None:
    missing = dataclasses.replace(gcs_settings, default_bucket="no-such-bucket", allowed_buckets=())
    for required, status in ((False, 200), (True, 503)):
        app = create_app(dataclasses.replace(missing, ready_requires_storage=required))
        with TestClient(app, timeout=120) as client:
            deadline = time.monotonic() + 120
            while "gcs" not in client.get("/readyz").json()["storage"]:
                assert time.monotonic() < deadline, client.get("/readyz").text
                time.sleep(0.05)
            response = client.get("/readyz")
            found = samples(client.get("/metrics").text)
        assert response.status_code == status, response.text
        check = response.json()["storage"]["gcs"]
        assert check["up"] is False and "no-such-bucket" in check["detail"] and "404" in check["detail"]
        assert found["cliplens_storage_up", (("source", "gcs"),)] == 0
        if required:
            assert "storage check failed" in response.json()["detail"]


def test_serve_refuses_an_image_root_that_is_not_a_readable_directory(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "CLIPLENS_IMAGE_ROOT": str(tmp_path / "missing"),
        "CLIPLENS_PRETRAINED": "none",
        "CLIPLENS_LOG_LEVEL": "ERROR",
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "cliplens.cli", "serve", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"cliplens: CLIPLENS_IMAGE_ROOT={tmp_path / 'missing'} is not a directory", done.stderr
    assert time.monotonic() - started < 60  # before any model is loaded
