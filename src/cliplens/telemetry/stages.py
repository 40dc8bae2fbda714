"""Stage timing: the one place where cliplens measures time.

Every stage boundary an item crosses is stamped here once, with the monotonic clock, and that
single measurement feeds all three sinks, so they can never disagree:

- the Prometheus histograms (per image as soon as the stage ends; per request at the end),
- the OpenTelemetry spans (one span per stage and request, created from the recorded stamps,
  with one event per item, named by its modality: `image` or `text`),
- the `Server-Timing` header (the same per-request stage windows, in milliseconds).

A `StageTiming` is one item in one stage: `queued` when it is handed to the stage, `start` when
a worker (download slot, CPU thread, model batch) picks it up, `end` when it is done. Stamps are
plain attribute writes, so worker threads may start and end timings the event loop created.

**Calls to storage.** What a stage asks of the world outside (each HTTP attempt to GCS, each read
of a local file) is a `ClientCall` the source records in the item's timing (`StageTiming.calls`):
plain data stamped with `now()`, no tracer and no context, so `pipeline/sources.py` stays free of
either. `finish` makes each ended call a child span of its stage span (`load` for downloads,
`cache` for GCS metadata), with OpenTelemetry's stable HTTP client conventions: kind CLIENT, named
by the method (`GET`), `http.request.method`, `server.address`, `server.port`, `url.full`,
`http.response.status_code` when an answer came, `http.request.resend_count` on retries only,
`http.response.body.size` for downloads (bytes on the wire; left out for a compressed body sent
without a length), and on failure `error.type` (the status code, the exception's class, or the
vocabulary's code when cliplens itself stopped the download, e.g. `too_large`) with status ERROR.
A failed attempt that is retried carries a `retry` event: `cliplens.retry.reason` (the label of
`cliplens_download_retries_total`) and `cliplens.retry.backoff_ms` (the wait chosen). `url.full`
is the object's URL without its query string (which only says `alt=media` or `alt=json`) and
never carries credentials (GCS takes a bearer header); the object name in it is the reference the
item event already carries. A local read is an INTERNAL span `read file` with `file.size`; its
path is left out: the reference is already in the item event, and the absolute path would only
add the server's directory layout.

**No user text.** An image's event carries its reference (`cliplens.image.ref`, what the client
named, cut to 256 characters; an http(s) URL without its query and fragment, which can hold a
signed URL's credentials, as the `url.full` of its calls does) and its `source` on the `load`
stage. A text's event never carries the text: `cliplens.text.length` (characters) and
`cliplens.text.sha256` (the first 16 hex digits of the SHA-256 of its UTF-8 bytes, as embedded)
let an operator tell texts apart and find repeats without reading them; only
`CLIPLENS_TRACE_TEXT=1` adds `cliplens.text.content`. A short or common text can still be guessed
from its hash by trying candidates: the hash is a correlation handle, not an anonymisation. The
tokenising and the cache lookup of a text request handle all its texts at once: their one event
has `cliplens.text.count` instead. A stage span counts its items in `cliplens.images` or
`cliplens.texts`.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.semconv.attributes.error_attributes import ERROR_TYPE
from opentelemetry.semconv.attributes.http_attributes import (
    HTTP_REQUEST_METHOD,
    HTTP_REQUEST_RESEND_COUNT,
    HTTP_RESPONSE_STATUS_CODE,
)
from opentelemetry.semconv.attributes.server_attributes import SERVER_ADDRESS, SERVER_PORT
from opentelemetry.semconv.attributes.url_attributes import URL_FULL
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode, Tracer

from cliplens.telemetry.metrics import Metrics
from cliplens.vocabulary import ErrorCode, ItemError, Modality, Stage

_MAX_REF_CHARS = 256
_URL_SCHEMES = ("http://", "https://")
HTTP_RESPONSE_BODY_SIZE = "http.response.body.size"
"""Not yet stable in the conventions (so not in `opentelemetry.semconv.attributes`)."""
FILE_SIZE = "file.size"
"""Not yet stable in the conventions either."""
_DEFAULT_PORTS = {"http": 80, "https": 443}
Attribute = str | int | float
_SUMMED_ATTRIBUTES = {
    "bytes": "cliplens.bytes",
    "hits": "cliplens.cache.hits",
    "misses": "cliplens.cache.misses",
}
"""Per-item attributes whose sum the stage span carries: bytes loaded, cache hits and misses."""


def exemplar_for(span_context: SpanContext | None) -> dict[str, str] | None:
    """The exemplar labels for an observation made on behalf of a sampled trace."""
    if span_context is None or not span_context.is_valid or not span_context.trace_flags.sampled:
        return None
    return {"trace_id": trace.format_trace_id(span_context.trace_id)}


def _without_query(reference: str) -> str:
    """An http(s) URL reference up to its query or fragment; any other reference as it is."""
    if not reference[:8].lower().startswith(_URL_SCHEMES):
        return reference
    return reference.split("?", 1)[0].split("#", 1)[0]


class _WallClock:
    """Maps monotonic stamps to the wall-clock nanoseconds spans want, from one anchor."""

    def __init__(self) -> None:
        self._offset = time.time_ns() - time.perf_counter_ns()

    def wall(self, monotonic_ns: int) -> int:
        return self._offset + monotonic_ns


def now() -> int:
    """The monotonic stamp used for every measurement."""
    return time.perf_counter_ns()


@dataclass(eq=False, slots=True)
class ClientCall:
    """One call a stage made outside cliplens (an HTTP attempt, a file read), recorded as plain
    data by the source and made a child span of the stage span by `RequestTimeline.finish`.

    Its methods name the conventions' attributes, so a source only says what happened. A worker
    thread may record one: `end` is its last write, and a call not ended when its request finishes
    (a read still running in its thread after the deadline) is not emitted.
    """

    name: str
    kind: SpanKind
    started_ns: int = field(default_factory=now)
    ended_ns: int | None = None
    attributes: dict[str, Attribute] = field(default_factory=dict)
    events: list[tuple[str, int, dict[str, Attribute]]] = field(default_factory=list)
    error_type: str | None = None

    @classmethod
    def http(cls, method: str, resend_count: int = 0) -> ClientCall:
        """An HTTP request attempt beginning now; `resend_count` is how many went before it."""
        call = cls(method, SpanKind.CLIENT, attributes={HTTP_REQUEST_METHOD: method})
        if resend_count:  # the conventions set it on retries only
            call.attributes[HTTP_REQUEST_RESEND_COUNT] = resend_count
        return call

    @classmethod
    def file_read(cls) -> ClientCall:
        """A read of a local file beginning now."""
        return cls("read file", SpanKind.INTERNAL)

    def sent(self, url: str) -> None:
        """The request goes out now, to `url` (no query string, no credentials): the span starts
        here, not where the attempt began, so that preparing it (an auth token) is not counted."""
        self.started_ns = now()
        parts = urlsplit(url)
        self.attributes[URL_FULL] = url
        self.attributes[SERVER_ADDRESS] = parts.hostname or ""
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme)
        if port is not None:
            self.attributes[SERVER_PORT] = port

    def answered(self, status: int) -> None:
        """The response's status line arrived; 4xx and 5xx fail the call."""
        self.attributes[HTTP_RESPONSE_STATUS_CODE] = status
        if status >= 400:
            self.fail(str(status))

    def received(self, body_bytes: int) -> None:
        """Bytes of the response body (HTTP) or of the file (read) that came in."""
        self.attributes[HTTP_RESPONSE_BODY_SIZE if self.kind is SpanKind.CLIENT else FILE_SIZE] = body_bytes

    def retried(self, reason: str, backoff_s: float) -> None:
        """The failure is retried after `backoff_s`; stamped when this attempt ended."""
        at = now() if self.ended_ns is None else self.ended_ns
        attributes: dict[str, Attribute] = {
            "cliplens.retry.reason": reason,
            "cliplens.retry.backoff_ms": round(backoff_s * 1e3, 3),
        }
        self.events.append(("retry", at, attributes))

    def fail(self, cause: BaseException | str) -> None:
        """Record why the call failed (the first cause wins): a status code or other low-cardinality
        name, the vocabulary's code of an ItemError, else the exception's class."""
        if self.error_type is not None:
            return
        if isinstance(cause, str):
            self.error_type = cause
        elif isinstance(cause, ItemError):
            self.error_type = cause.code.value
        else:
            self.error_type = type(cause).__qualname__

    def end(self) -> None:
        if self.ended_ns is None:
            self.ended_ns = now()


@dataclass(eq=False, slots=True)
class StageTiming:
    """One item in one stage: when it was queued, started and ended, and how it ended."""

    stage: Stage
    index: int
    reference: str
    queued_ns: int
    _metrics: Metrics | None
    _exemplar: dict[str, str] | None
    started_ns: int | None = None
    ended_ns: int | None = None
    error: ItemError | None = None
    attributes: dict[str, Attribute] = field(default_factory=dict)
    link: SpanContext | None = None
    calls: list[ClientCall] = field(default_factory=list)
    """What the stage asked of storage for this item, in order (one entry per attempt)."""

    def start(self, at: int | None = None) -> None:
        """A worker picked the image up: the wait is over, the work begins."""
        if self.ended_ns is None:
            self.started_ns = now() if at is None else at

    def end(self, error: ItemError | None = None, at: int | None = None) -> None:
        """The stage is done with the image; observe its work and wait at once (only the first time)."""
        if self.ended_ns is not None:
            return
        self.ended_ns = now() if at is None else at
        if self.started_ns is None:
            self.started_ns = self.ended_ns
        self.error = error
        if self._metrics is None:
            return
        queue_s = (self.started_ns - self.queued_ns) / 1e9
        work_s = (self.ended_ns - self.started_ns) / 1e9 if self.stage.has_own_work else None
        self._metrics.observe_image_stage(self.stage, work_s, queue_s, self._exemplar)

    @contextmanager
    def working(self) -> Iterator[StageTiming]:
        """Start now, end on exit; an ItemError raised inside is recorded, then re-raised."""
        self.start()
        try:
            yield self
        except ItemError as exc:
            self.end(exc)
            raise
        except asyncio.CancelledError:
            self.end(ItemError(ErrorCode.TIMEOUT, "cancelled at the request deadline"))
            raise
        except BaseException:
            self.end()
            raise
        self.end()

    @property
    def work_ms(self) -> float:
        if self.started_ns is None or self.ended_ns is None:
            return 0.0
        return (self.ended_ns - self.started_ns) / 1e6

    @property
    def queue_ms(self) -> float:
        if self.started_ns is None:
            return 0.0
        return (self.started_ns - self.queued_ns) / 1e6


@dataclass(frozen=True)
class ServerTiming:
    """Per-request stage windows and the total, in milliseconds, ready for the header."""

    stages_ms: dict[str, float]
    total_ms: float

    def header(self) -> str:
        entries = [f"{stage};dur={ms:.1f}" for stage, ms in self.stages_ms.items()]
        entries.append(f"total;dur={self.total_ms:.1f}")
        return ", ".join(entries)


class RequestTimeline:
    """All stage timings of one request, turned into spans and request metrics by `finish`.

    The per-stage histograms describe images; a text request still gets its spans, Server-Timing
    and `cliplens_request_seconds{modality="text"}`, but leaves the image stage families alone.
    `trace_text` (`CLIPLENS_TRACE_TEXT`) puts each text itself in its events, see the module docstring.
    """

    def __init__(
        self,
        metrics: Metrics,
        modality: Modality,
        request_span: SpanContext | None,
        trace_text: bool = False,
    ) -> None:
        self._metrics = metrics
        self._modality = modality
        self._trace_text = trace_text
        self._prefix = f"cliplens.{modality.value}."
        """Of every item event attribute: `cliplens.image.` or `cliplens.text.`."""
        self._request_span = request_span
        self._exemplar = exemplar_for(request_span)
        self._clock = _WallClock()
        self._timings: list[StageTiming] = []
        self.started_ns = now()

    def enter(self, index: int, stage: Stage, reference: str) -> StageTiming:
        """The item at `index` is handed to `stage` now; `reference` is what the client sent for it
        (an image's reference, or the text itself, which is kept only with `trace_text`)."""
        if self._modality is Modality.IMAGE:
            return self._enter(index, stage, _without_query(reference)[:_MAX_REF_CHARS])
        timing = self._enter(index, stage, reference if self._trace_text else "")
        timing.attributes["length"] = len(reference)
        digest = hashlib.sha256(reference.encode("utf-8", "surrogatepass"))
        timing.attributes["sha256"] = digest.hexdigest()[:16]
        return timing

    def enter_all(self, stage: Stage, count: int) -> StageTiming:
        """All `count` items are handed to `stage` at once (a text request's tokenising, its cache
        lookup): one timing at index 0 that counts them instead of naming one."""
        timing = self._enter(0, stage, "")
        timing.attributes["count"] = count
        return timing

    def _enter(self, index: int, stage: Stage, reference: str) -> StageTiming:
        timing = StageTiming(
            stage=stage,
            index=index,
            reference=reference,
            queued_ns=now(),
            _metrics=self._metrics if self._modality is Modality.IMAGE else None,
            _exemplar=self._exemplar,
        )
        self._timings.append(timing)
        return timing

    def timings(self, stage: Stage | None = None) -> list[StageTiming]:
        """Finished timings, in the order they were entered."""
        return [t for t in self._timings if t.ended_ns is not None and (stage is None or t.stage == stage)]

    def per_image(self) -> dict[int, dict[str, tuple[float, float]]]:
        """{index: {stage: (queue_ms, work_ms)}} of every finished image timing."""
        table: dict[int, dict[str, tuple[float, float]]] = {}
        for timing in self.timings():
            table.setdefault(timing.index, {})[timing.stage.value] = (timing.queue_ms, timing.work_ms)
        return table

    def finish(self, tracer: Tracer, parent: Context | None = None) -> ServerTiming:
        """Emit one span per stage under the request span and observe the per-request histograms."""
        ended_ns = now()
        stages_ms: dict[str, float] = {}
        for stage in Stage:
            timings = self.timings(stage)
            if not timings:
                continue
            first = min(t.queued_ns for t in timings)
            last = max(t.ended_ns for t in timings if t.ended_ns is not None)
            stages_ms[stage.value] = (last - first) / 1e6
            if self._modality is Modality.IMAGE:
                self._metrics.observe_request_stage(stage, (last - first) / 1e9, self._exemplar)
            self._emit_stage_span(tracer, parent, stage, timings, first, last)
        total_s = (ended_ns - self.started_ns) / 1e9
        self._metrics.observe_request(self._modality, total_s, self._exemplar)
        return ServerTiming(stages_ms, total_s * 1e3)

    def _emit_stage_span(
        self,
        tracer: Tracer,
        parent: Context | None,
        stage: Stage,
        timings: Sequence[StageTiming],
        first_ns: int,
        last_ns: int,
    ) -> None:
        links = {(t.link.trace_id, t.link.span_id): t.link for t in timings if t.link is not None}
        span = tracer.start_span(
            stage.value,
            context=parent,
            kind=SpanKind.INTERNAL,
            start_time=self._clock.wall(first_ns),
            links=[Link(ctx) for ctx in links.values()],
        )
        if not span.is_recording():
            span.end(end_time=self._clock.wall(last_ns))
            return
        failures = [t for t in timings if t.error is not None]
        items = sum(int(t.attributes.get("count", 1)) for t in timings)
        span.set_attribute(f"cliplens.{self._modality.value}s", items)
        span.set_attribute("cliplens.failed", len(failures))
        for attribute, total in _SUMMED_ATTRIBUTES.items():  # the items' counts, summed on the span
            counts = [int(t.attributes[attribute]) for t in timings if attribute in t.attributes]
            if counts:
                span.set_attribute(total, sum(counts))
        lags = [float(t.attributes["loop_lag_ms"]) for t in timings if "loop_lag_ms" in t.attributes]
        if lags:  # the event loop was late while these items loaded: the worst, on the stage span
            span.set_attribute("cliplens.loop_lag_ms", max(lags))
        for timing in timings:
            assert timing.ended_ns is not None
            span.add_event(
                self._modality.value,
                self._event_attributes(timing),
                timestamp=self._clock.wall(timing.ended_ns),
            )
        self._emit_calls(tracer, span, timings)
        if failures:
            codes = sorted({t.error.code.value for t in failures if t.error is not None})
            span.set_status(
                Status(
                    StatusCode.ERROR, f"{len(failures)} of {len(timings)} items failed: {', '.join(codes)}"
                )
            )
        span.end(end_time=self._clock.wall(last_ns))

    def _event_attributes(self, timing: StageTiming) -> dict[str, Attribute]:
        """The item event: its index, work and wait, its stage's own attributes and its error; an
        image's reference, a text itself only with `trace_text`."""
        prefix = self._prefix
        attributes: dict[str, Attribute] = {f"{prefix}index": timing.index}
        if self._modality is Modality.IMAGE:
            attributes[f"{prefix}ref"] = timing.reference
        elif timing.reference:  # kept by `enter` only with trace_text
            attributes[f"{prefix}content"] = timing.reference
        attributes[f"{prefix}work_ms"] = round(timing.work_ms, 3)
        attributes[f"{prefix}queue_ms"] = round(timing.queue_ms, 3)
        attributes.update({f"{prefix}{k}": v for k, v in timing.attributes.items()})
        if timing.error is not None:
            attributes[f"{prefix}error"] = timing.error.code.value
            attributes[f"{prefix}error_message"] = timing.error.message
        return attributes

    def _emit_calls(self, tracer: Tracer, stage_span: Span, timings: Sequence[StageTiming]) -> None:
        """Each ended call of these items, as a child span of their stage span."""
        context: Context | None = None
        for timing in timings:
            for call in list(timing.calls):  # a list a worker thread may still append to
                if call.ended_ns is None:
                    continue
                if context is None:
                    context = trace.set_span_in_context(stage_span)
                child = tracer.start_span(
                    call.name,
                    context=context,
                    kind=call.kind,
                    start_time=self._clock.wall(call.started_ns),
                    attributes=call.attributes,
                )
                for name, at, attributes in call.events:
                    child.add_event(name, attributes, timestamp=self._clock.wall(at))
                if call.error_type is not None:
                    child.set_attribute(ERROR_TYPE, call.error_type)
                    child.set_status(Status(StatusCode.ERROR))
                child.end(end_time=self._clock.wall(call.ended_ns))


def model_attributes(described: Mapping[str, str | float]) -> dict[str, str | float]:
    """What describes the served model (runtime, device, dtype, int8's fidelity) as the attributes
    of each `embed batch` span: `cliplens.model.<key>`. Built once, not per batch."""
    return {f"cliplens.model.{key}": value for key, value in described.items()}


class BatchTiming:
    """One model forward pass: its own span (linked to the requests it served) and histograms."""

    def __init__(
        self,
        tracer: Tracer,
        metrics: Metrics,
        modality: Modality,
        size: int,
        requests: Sequence[SpanContext],
        model: Mapping[str, str | float] | None = None,
    ) -> None:
        """`model`: the span attributes of the model that ran it (`model_attributes`)."""
        self._tracer = tracer
        self._model = model or {}
        self._metrics = metrics
        self._modality = modality
        self.size = size
        unique = {(ctx.trace_id, ctx.span_id): ctx for ctx in requests if ctx.is_valid}
        self._requests = list(unique.values())
        self._clock = _WallClock()
        self.started_ns = 0
        self.ended_ns = 0
        self.span_context: SpanContext | None = None

    @contextmanager
    def measuring(self) -> Iterator[BatchTiming]:
        """Time the forward pass inside the block, as a root span named `embed batch`."""
        self.started_ns = now()
        span = self._tracer.start_span(
            "embed batch",
            context=Context(),
            kind=SpanKind.INTERNAL,
            start_time=self._clock.wall(self.started_ns),
            links=[Link(ctx) for ctx in self._requests],
            attributes={
                "cliplens.batch.size": self.size,
                "cliplens.modality": self._modality.value,
                **self._model,
            },
        )
        self.span_context = span.get_span_context()
        try:
            yield self
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            self.ended_ns = now()
            span.end(end_time=self._clock.wall(self.ended_ns))
            exemplar = exemplar_for(self.span_context)
            self._metrics.embed_batch_size.labels(self._modality).observe(self.size, exemplar)
            self._metrics.embed_batch_seconds.labels(self._modality).observe(
                (self.ended_ns - self.started_ns) / 1e9, exemplar
            )
