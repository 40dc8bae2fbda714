"""Stage timings become spans: storage calls as child spans of their stage, texts without their text."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from cliplens.telemetry.metrics import Metrics
from cliplens.telemetry.stages import ClientCall, RequestTimeline
from cliplens.vocabulary import ErrorCode, ItemError, Modality, Stage

TEXT = "my neighbour's dog, photographed through the fence"


def emitted(
    modality: Modality, fill: Callable[[RequestTimeline], None], trace_text: bool = False
) -> list[ReadableSpan]:
    """The spans one request's timeline emits, after `fill` has entered and ended its timings."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("t")
    with tracer.start_as_current_span("request") as request:
        timeline = RequestTimeline(Metrics(), modality, request.get_span_context(), trace_text)
        fill(timeline)
        timeline.finish(tracer)
    return list(exporter.get_finished_spans())


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def test_a_call_classifies_its_failure_once() -> None:
    first = ClientCall.http("GET")
    assert first.kind is SpanKind.CLIENT and first.attributes == {"http.request.method": "GET"}
    first.sent("https://storage.example:8443/storage/v1/b/photos/o/a%2Fb.jpg")
    first.answered(503)
    first.fail(TimeoutError())  # a later cause does not replace the first
    assert first.error_type == "503"
    assert first.attributes["server.address"] == "storage.example"
    assert first.attributes["server.port"] == 8443
    second = ClientCall.http("GET", resend_count=1)
    second.sent("https://www.googleapis.com/storage/v1/b/photos/o/a.jpg")
    second.answered(200)
    assert second.error_type is None
    assert second.attributes["server.port"] == 443
    assert second.attributes["http.request.resend_count"] == 1
    cut = ClientCall.http("GET")
    cut.fail(ItemError(ErrorCode.TOO_LARGE, "over the cap"))
    assert cut.error_type == "too_large"
    timed_out = ClientCall.http("GET")
    timed_out.fail(TimeoutError())
    assert timed_out.error_type == "TimeoutError"


def test_calls_become_child_spans_of_their_stage_with_their_own_times_and_events() -> None:
    calls: list[ClientCall] = []

    def fill(timeline: RequestTimeline) -> None:
        timing = timeline.enter(0, Stage.LOAD, "gs://photos/a.jpg")
        timing.start()
        failed = ClientCall.http("GET")
        failed.sent("http://127.0.0.1:4443/storage/v1/b/photos/o/a.jpg")
        failed.answered(503)
        failed.end()
        failed.retried("http_5xx", 0.125)
        ok = ClientCall.http("GET", resend_count=1)
        ok.sent("http://127.0.0.1:4443/storage/v1/b/photos/o/a.jpg")
        ok.answered(200)
        ok.received(1234)
        ok.end()
        left_running = ClientCall.file_read()  # never ended: a read still in its thread
        timing.calls.extend([failed, ok, left_running])
        calls.extend(timing.calls)
        timing.end()

    spans = emitted(Modality.IMAGE, fill)
    (load,) = named(spans, "load")
    attempts = sorted(named(spans, "GET"), key=lambda s: s.start_time or 0)
    assert not named(spans, "read file")
    assert len(attempts) == 2
    assert load.start_time is not None and load.end_time is not None
    for attempt, call in zip(attempts, calls[:2], strict=True):
        assert attempt.kind is SpanKind.CLIENT
        assert attempt.parent is not None and attempt.parent.span_id == load.context.span_id
        assert attempt.context.trace_id == load.context.trace_id
        assert attempt.start_time is not None and attempt.end_time is not None
        assert call.ended_ns is not None
        assert attempt.end_time - attempt.start_time == call.ended_ns - call.started_ns
        assert load.start_time <= attempt.start_time <= attempt.end_time <= load.end_time
    failed, ok = attempts
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes is not None and failed.attributes["error.type"] == "503"
    assert "http.request.resend_count" not in failed.attributes
    assert [(e.name, dict(e.attributes or {})) for e in failed.events] == [
        ("retry", {"cliplens.retry.reason": "http_5xx", "cliplens.retry.backoff_ms": 125.0})
    ]
    assert ok.status.status_code is StatusCode.UNSET
    assert ok.attributes is not None and "error.type" not in ok.attributes
    assert ok.attributes["http.response.status_code"] == 200
    assert ok.attributes["http.response.body.size"] == 1234
    assert ok.attributes["http.request.resend_count"] == 1


def test_an_image_event_carries_its_reference() -> None:
    def fill(timeline: RequestTimeline) -> None:
        with timeline.enter(3, Stage.DECODE, "album/1/a.jpg").working():
            pass

    (decode,) = named(emitted(Modality.IMAGE, fill), "decode")
    assert decode.attributes is not None and decode.attributes["cliplens.images"] == 1
    (event,) = decode.events
    assert event.name == "image"
    assert event.attributes is not None
    assert event.attributes["cliplens.image.ref"] == "album/1/a.jpg"
    assert event.attributes["cliplens.image.index"] == 3


@pytest.mark.parametrize("trace_text", [False, True])
def test_a_text_event_carries_its_length_and_hash_and_the_text_only_when_asked(trace_text: bool) -> None:
    def fill(timeline: RequestTimeline) -> None:
        with timeline.enter_all(Stage.PREPROCESS, 2).working():
            pass
        with timeline.enter(0, Stage.EMBED, TEXT).working():
            pass
        timeline.enter(1, Stage.EMBED, TEXT + " again").end(ItemError(ErrorCode.TIMEOUT, "request deadline"))

    spans = emitted(Modality.TEXT, fill, trace_text)
    (tokenize,) = named(spans, "preprocess")
    assert tokenize.attributes is not None and tokenize.attributes["cliplens.texts"] == 2
    (together,) = tokenize.events
    assert together.name == "text"
    assert dict(together.attributes or {}).keys() == {
        "cliplens.text.index",
        "cliplens.text.count",
        "cliplens.text.work_ms",
        "cliplens.text.queue_ms",
    }
    (embed,) = named(spans, "embed")
    assert embed.attributes is not None and embed.attributes["cliplens.texts"] == 2
    events = {int(e.attributes["cliplens.text.index"]): e for e in embed.events if e.attributes}  # type: ignore[arg-type]
    assert {e.name for e in events.values()} == {"text"}
    first = events[0].attributes
    assert first is not None
    assert first["cliplens.text.length"] == len(TEXT)
    assert first["cliplens.text.sha256"] == hashlib.sha256(TEXT.encode()).hexdigest()[:16]
    assert events[1].attributes is not None and events[1].attributes["cliplens.text.error"] == "timeout"
    assert not any(key.startswith("cliplens.image.") for e in embed.events for key in e.attributes or {})
    if trace_text:
        assert first["cliplens.text.content"] == TEXT
    else:
        assert "cliplens.text.content" not in first
        assert all(TEXT not in span.to_json() for span in spans)


def test_a_text_that_is_not_valid_unicode_is_still_hashed() -> None:
    lone_surrogate = "caption \ud800"

    def fill(timeline: RequestTimeline) -> None:
        with timeline.enter(0, Stage.EMBED, lone_surrogate).working():
            pass

    (embed,) = named(emitted(Modality.TEXT, fill), "embed")
    (event,) = embed.events
    assert event.attributes is not None and event.attributes["cliplens.text.length"] == len(lone_surrogate)
