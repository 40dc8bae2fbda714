"""Stage timing: the one place where cliplens measures time.

Every stage boundary an image crosses is stamped here once, with the monotonic clock, and that
single measurement feeds all three sinks, so they can never disagree:

- the Prometheus histograms (per image as soon as the stage ends; per request at the end),
- the OpenTelemetry spans (one span per stage and request, created from the recorded stamps,
  with one `image` event per image carrying its reference, work and wait times),
- the `Server-Timing` header (the same per-request stage windows, in milliseconds).

A `StageTiming` is one image in one stage: `queued` when it is handed to the stage, `start` when
a worker (download slot, CPU thread, model batch) picks it up, `end` when it is done. Stamps are
plain attribute writes, so worker threads may start and end timings the event loop created.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, Tracer

from cliplens.telemetry.metrics import Metrics
from cliplens.vocabulary import ErrorCode, ItemError, Modality, Stage

_MAX_REF_CHARS = 256
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
class StageTiming:
    """One image in one stage: when it was queued, started and ended, and how it ended."""

    stage: Stage
    index: int
    reference: str
    queued_ns: int
    _metrics: Metrics | None
    _exemplar: dict[str, str] | None
    started_ns: int | None = None
    ended_ns: int | None = None
    error: ItemError | None = None
    attributes: dict[str, str | int | float] = field(default_factory=dict)
    link: SpanContext | None = None

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
    """

    def __init__(self, metrics: Metrics, modality: Modality, request_span: SpanContext | None) -> None:
        self._metrics = metrics
        self._modality = modality
        self._request_span = request_span
        self._exemplar = exemplar_for(request_span)
        self._clock = _WallClock()
        self._timings: list[StageTiming] = []
        self.started_ns = now()

    def enter(self, index: int, stage: Stage, reference: str) -> StageTiming:
        """The image at `index` is handed to `stage` now."""
        timing = StageTiming(
            stage=stage,
            index=index,
            reference=reference[:_MAX_REF_CHARS],
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
        span.set_attribute("cliplens.images", len(timings))
        span.set_attribute("cliplens.failed", len(failures))
        for attribute, total in _SUMMED_ATTRIBUTES.items():  # the items' counts, summed on the span
            counts = [int(t.attributes[attribute]) for t in timings if attribute in t.attributes]
            if counts:
                span.set_attribute(total, sum(counts))
        for timing in timings:
            attributes: dict[str, str | int | float] = {
                "cliplens.image.index": timing.index,
                "cliplens.image.ref": timing.reference,
                "cliplens.image.work_ms": round(timing.work_ms, 3),
                "cliplens.image.queue_ms": round(timing.queue_ms, 3),
            }
            attributes.update({f"cliplens.image.{k}": v for k, v in timing.attributes.items()})
            if timing.error is not None:
                attributes["cliplens.image.error"] = timing.error.code.value
                attributes["cliplens.image.error_message"] = timing.error.message
            assert timing.ended_ns is not None
            span.add_event("image", attributes, timestamp=self._clock.wall(timing.ended_ns))
        if failures:
            codes = sorted({t.error.code.value for t in failures if t.error is not None})
            span.set_status(
                Status(
                    StatusCode.ERROR, f"{len(failures)} of {len(timings)} items failed: {', '.join(codes)}"
                )
            )
        span.end(end_time=self._clock.wall(last_ns))


class BatchTiming:
    """One model forward pass: its own span (linked to the requests it served) and histograms."""

    def __init__(
        self,
        tracer: Tracer,
        metrics: Metrics,
        modality: Modality,
        size: int,
        requests: Sequence[SpanContext],
    ) -> None:
        self._tracer = tracer
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
            attributes={"cliplens.batch.size": self.size, "cliplens.modality": self._modality.value},
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
