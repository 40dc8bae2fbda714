"""Every call to storage is a span under the stage that made it: each GCS attempt a CLIENT span
`GET` with the stable HTTP conventions (retries counted, failures typed), each local read a
`read file` span. Storage is the fault-injecting stand-in, spans are the app's own, exported."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from litestar import Litestar
from litestar.testing import TestClient
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from cliplens.app import create_app
from cliplens.settings import Settings
from tests.conftest import photo_bytes, wait_ready
from tests.harness.faulty_gcs import FaultyGcs, Serve, Status, Trickle
from tests.integration.test_storage_faults import BUCKET, PHOTO_A, settings_for

Client = TestClient[Litestar]


@pytest.fixture
def gcs() -> Iterator[FaultyGcs]:
    with FaultyGcs() as server:
        yield server


@contextmanager
def traced(settings: Settings) -> Iterator[tuple[Client, InMemorySpanExporter]]:
    """The app, ready, with every span it ends also kept in memory."""
    app = create_app(settings)
    exporter = InMemorySpanExporter()
    app.state.runtime.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    with TestClient(app, timeout=120) as client:
        wait_ready(client)
        yield client, exporter


def request_spans(client: Client, exporter: InMemorySpanExporter, inputs: list[str]) -> list[ReadableSpan]:
    """The spans of the trace of one embeddings request."""
    response = client.post("/v1/embeddings", json={"input": inputs})
    assert response.status_code == 200, response.text
    trace_id = int(response.headers["x-trace-id"], 16)
    return [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]


def children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    found = [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]
    return sorted(found, key=lambda s: s.start_time or 0)


def stage(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    (span,) = [s for s in spans if s.name == name]
    return span


def object_url(gcs: FaultyGcs, quoted_name: str) -> str:
    return f"{gcs.url}/storage/v1/b/{BUCKET}/o/{quoted_name}"


def test_a_retried_download_is_two_attempts_under_its_load_span(tiny_model: str, gcs: FaultyGcs) -> None:
    gcs.put(BUCKET, "flaky/503.jpg", Status(503), Serve(PHOTO_A))
    with traced(settings_for(tiny_model, gcs.url)) as (client, exporter):
        spans = request_spans(client, exporter, ["flaky/503.jpg"])
    load = stage(spans, "load")
    attempts = children(spans, load)
    assert [(a.name, a.kind) for a in attempts] == [("GET", SpanKind.CLIENT)] * 2
    failed, ok = (dict(a.attributes or {}) for a in attempts)
    common = {
        "http.request.method": "GET",
        "server.address": "127.0.0.1",
        "server.port": gcs.port,
        "url.full": object_url(gcs, "flaky%2F503.jpg"),
    }
    assert failed == {**common, "http.response.status_code": 503, "error.type": "503"}
    assert ok == {
        **common,
        "http.response.status_code": 200,
        "http.request.resend_count": 1,
        "http.response.body.size": len(PHOTO_A),
    }
    assert [a.status.status_code for a in attempts] == [StatusCode.ERROR, StatusCode.UNSET]

    (retry,) = attempts[0].events
    assert retry.name == "retry" and retry.attributes is not None
    assert retry.attributes["cliplens.retry.reason"] == "http_5xx"
    backoff_ms = retry.attributes["cliplens.retry.backoff_ms"]
    assert isinstance(backoff_ms, float) and 100 <= backoff_ms <= 200  # 0.1 s, plus up to 0.1 s jitter
    assert not attempts[1].events
    assert attempts[0].end_time is not None and attempts[1].start_time is not None
    assert (attempts[1].start_time - attempts[0].end_time) / 1e6 >= backoff_ms, "the backoff was waited"
    assert load.start_time is not None and load.end_time is not None
    for attempt in attempts:
        assert attempt.start_time is not None and attempt.end_time is not None
        assert load.start_time <= attempt.start_time <= attempt.end_time <= load.end_time
    (image,) = load.events
    assert image.attributes is not None and image.attributes["cliplens.image.bytes"] == len(PHOTO_A)
    assert gcs.count(BUCKET, "flaky/503.jpg") == 2


def test_a_missing_object_is_one_failed_attempt(tiny_model: str, gcs: FaultyGcs) -> None:
    gcs.put(BUCKET, "missing.jpg", Status(404))
    with traced(settings_for(tiny_model, gcs.url)) as (client, exporter):
        spans = request_spans(client, exporter, ["missing.jpg"])
    load = stage(spans, "load")
    (attempt,) = children(spans, load)
    assert attempt.name == "GET" and attempt.kind is SpanKind.CLIENT
    assert attempt.attributes is not None
    assert attempt.attributes["http.response.status_code"] == 404
    assert attempt.attributes["error.type"] == "404"
    assert "http.request.resend_count" not in attempt.attributes
    assert attempt.status.status_code is StatusCode.ERROR
    assert not attempt.events, "a 404 is never retried"
    (image,) = load.events
    assert image.attributes is not None and image.attributes["cliplens.image.error"] == "not_found"


def test_a_timed_out_attempt_is_typed_by_its_exception(tiny_model: str, gcs: FaultyGcs) -> None:
    gcs.put(BUCKET, "slow.jpg", Trickle(PHOTO_A, chunk=1024, interval_s=0.05))
    settings = settings_for(tiny_model, gcs.url, download_timeout_s=0.3, download_retries=0)
    with traced(settings) as (client, exporter):
        spans = request_spans(client, exporter, ["slow.jpg"])
    (attempt,) = children(spans, stage(spans, "load"))
    assert attempt.attributes is not None
    error_type = attempt.attributes["error.type"]
    assert isinstance(error_type, str) and error_type.endswith("TimeoutError"), error_type
    assert attempt.attributes["http.response.status_code"] == 200, "the answer came, the body did not"
    body = attempt.attributes["http.response.body.size"]
    assert isinstance(body, int) and 0 < body < len(PHOTO_A)
    assert attempt.status.status_code is StatusCode.ERROR


def test_the_cache_metadata_lookup_is_its_own_attempt_under_the_cache_span(
    tiny_model: str, gcs: FaultyGcs
) -> None:
    """The stand-in answers the metadata request with the object itself (not JSON): the lookup
    then names no generation, and the object is loaded."""
    gcs.put(BUCKET, "good/a.jpg", Serve(PHOTO_A))
    settings = settings_for(tiny_model, gcs.url, cache_bytes=16 * 1024 * 1024)
    with traced(settings) as (client, exporter):
        spans = request_spans(client, exporter, ["good/a.jpg"])
    (lookup,) = children(spans, stage(spans, "cache"))
    (download,) = children(spans, stage(spans, "load"))
    for attempt in (lookup, download):
        assert attempt.name == "GET" and attempt.kind is SpanKind.CLIENT
        assert attempt.attributes is not None
        assert attempt.attributes["url.full"] == object_url(gcs, "good%2Fa.jpg")
        assert attempt.attributes["http.response.status_code"] == 200
    assert lookup.attributes is not None and "http.response.body.size" not in lookup.attributes
    assert download.attributes is not None and download.attributes["http.response.body.size"] == len(PHOTO_A)
    assert gcs.count(BUCKET, "good/a.jpg") == 2


def test_a_local_read_is_an_internal_span_under_its_load_span(settings: Settings, photo_dir: Path) -> None:
    with traced(dataclasses.replace(settings, cache_bytes=0)) as (client, exporter):
        spans = request_spans(client, exporter, ["album/1/a.jpg"])
    load = stage(spans, "load")
    (read,) = children(spans, load)
    assert read.name == "read file" and read.kind is SpanKind.INTERNAL
    assert dict(read.attributes or {}) == {"file.size": len(photo_bytes("album/1/a.jpg"))}
    assert str(photo_dir) not in read.to_json(), "the server's directory stays out of traces"
    assert read.status.status_code is StatusCode.UNSET
