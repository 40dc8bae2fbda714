"""The Prometheus metric families of cliplens: a public contract, like the HTTP API.

Names carry the `cliplens_` prefix and base units; labels are bounded (stage, outcome, modality),
never per image, request or user. Each app builds its own `Metrics` on its own registry, so two
apps in one process never share counts.

What the stage families mean, for a request whose images stream through the stages:

- `cliplens_image_stage_seconds{stage}`: per image, the *work* of one stage (a download, a decode,
  a preprocess), from the moment a worker picked the image up to the moment it finished.
- `cliplens_stage_queue_seconds{stage}`: per image, the *wait* before that work started: for a
  download slot (`load`), for a CPU worker (`decode`, `preprocess`), for a model batch (`embed`).
- `cliplens_request_stage_seconds{stage}`: per request, the wall time the request had images in the
  stage, waiting or working: from the first of its images entering the stage to the last leaving
  it. Stages overlap in time because images stream, so these do not add up to the total.
- `cliplens_request_seconds{modality}`: the whole request, as the handler saw it.

Every observation made while a sampled request is being served carries its trace id as an
exemplar, so a point on a Grafana panel opens the trace that produced it.

Each of these four families also has exact `_min_seconds` / `_max_seconds` gauges over a sliding
window (`cliplens_image_stage_min_seconds{stage}`, ...; see telemetry/extremes.py), fed by the
same `observe_*` call, so histogram and extremes can never disagree. The in-flight gauges, which a
scrape only samples, have exact window extremes too (`cliplens_requests_in_flight_max`: the peak
concurrency between scrapes).
"""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)

from cliplens.telemetry.extremes import WindowedExtremes
from cliplens.telemetry.threads import POOLS, MeteredPool, ThreadsCollector
from cliplens.vocabulary import IMAGE_WORK_STAGES, ErrorCode, Modality, RequestErrorCode, Source, Stage

OUTCOMES: tuple[str, ...] = ("ok", *ErrorCode)
REJECTIONS: tuple[RequestErrorCode, ...] = (RequestErrorCode.OVERLOADED, RequestErrorCode.SHUTTING_DOWN)
"""The request errors counted by `cliplens_rejected_requests_total{reason}` (refused before any work)."""
RETRY_REASONS: tuple[str, ...] = ("http_429", "http_5xx", "connection", "timeout")
DOWNLOAD_SOURCES: tuple[Source, ...] = (Source.GCS, Source.URL)
"""The sources that download over HTTP, and so may retry: `cliplens_download_retries_total{source}`."""
CACHE_TIERS: tuple[str, ...] = ("memory", "redis")
CACHE_LOOKUP_RESULTS: tuple[str, ...] = ("hit", "miss", "error", "bypass")
CACHE_WRITE_RESULTS: tuple[str, ...] = ("ok", "error", "bypass")


def geometric_buckets(start: float, factor: float, stop: float) -> tuple[float, ...]:
    """Bucket bounds start, start*factor, ... up to the first one >= stop."""
    bounds = [start]
    while bounds[-1] < stop:
        bounds.append(round(bounds[-1] * factor, 9))
    return tuple(bounds)


Exemplar = dict[str, str] | None

LATENCY_BUCKETS = geometric_buckets(0.0005, 1.5, 60.0)
"""0.5 ms to ~74 s in steps of x1.5: resolves a 2 ms preprocess and a 9 s download alike."""
COUNT_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 50, 64, 100, 128, 256, 512, 1024)


class Metrics:
    """The metric families of one app, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry | None = None, extremes_window_s: float = 15.0) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        if registry is None:
            # The process's own series (process_resident_memory_bytes, process_cpu_seconds_total,
            # open fds, python_gc_*, python_info), which prometheus_client puts on its global registry only.
            for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                reg.register(standard)
        self.extremes = WindowedExtremes(extremes_window_s)
        self.extremes.family("cliplens_request_stage", "per-request stage time", ["stage"])
        self.extremes.family("cliplens_image_stage", "per-image stage work", ["stage"])
        self.extremes.family("cliplens_stage_queue", "per-image stage wait", ["stage"])
        self.extremes.family("cliplens_request", "whole-request time", ["modality"])
        self.extremes.family("cliplens_requests_in_flight", "requests in flight", unit="")
        self.extremes.family("cliplens_images_in_flight", "images in flight", unit="")
        self.extremes.family("cliplens_event_loop_lag", "event-loop lag")
        reg.register(self.extremes)
        self._in_flight = (0, 0)
        self.request_stage_seconds = Histogram(
            "cliplens_request_stage_seconds",
            "Per request: wall time the request had images in each stage (waiting or working).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.image_stage_seconds = Histogram(
            "cliplens_image_stage_seconds",
            "Per image: work time of one stage, without the wait before it.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.stage_queue_seconds = Histogram(
            "cliplens_stage_queue_seconds",
            "Per image: time waiting for a download slot, a CPU worker or a model batch.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.request_seconds = Histogram(
            "cliplens_request_seconds",
            "Whole embeddings request, from parsed body to response.",
            ["modality"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.request_images = Histogram(
            "cliplens_request_images",
            "Images per embeddings request.",
            buckets=COUNT_BUCKETS,
            registry=reg,
        )
        self.requests_in_flight = Gauge(
            "cliplens_requests_in_flight",
            "Embeddings requests being served now (the concurrency level).",
            registry=reg,
        )
        self.images_total = Counter(
            "cliplens_images_total",
            "Images finished, by outcome: ok or the item error code.",
            ["outcome"],
            registry=reg,
        )
        self.texts_total = Counter(
            "cliplens_texts_total",
            "Texts embedded.",
            registry=reg,
        )
        self.embed_batch_size = Histogram(
            "cliplens_embed_batch_size",
            "Items per model forward pass (images from any number of requests).",
            ["modality"],
            buckets=COUNT_BUCKETS,
            registry=reg,
        )
        self.embed_batch_seconds = Histogram(
            "cliplens_embed_batch_seconds",
            "Duration of one model forward pass, including the copy to and from the device.",
            ["modality"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.images_in_flight = Gauge(
            "cliplens_images_in_flight",
            "Images admitted and not finished; admission control refuses requests beyond its bound.",
            registry=reg,
        )
        self.images_in_flight_limit = Gauge(
            "cliplens_images_in_flight_limit",
            "The admission bound on images in flight (CLIPLENS_MAX_IMAGES_IN_FLIGHT).",
            registry=reg,
        )
        self.memory_reserved_bytes = Gauge(
            "cliplens_memory_reserved_bytes",
            "Bytes held in the memory budget: bodies, encoded images, predicted decoded pixels, tensors.",
            registry=reg,
        )
        self.memory_budget_bytes = Gauge(
            "cliplens_memory_budget_bytes",
            "The memory budget (CLIPLENS_MEMORY_BUDGET_BYTES); work beyond it waits.",
            registry=reg,
        )
        self.rejected_requests_total = Counter(
            "cliplens_rejected_requests_total",
            "Requests refused before any work, by reason: overloaded (429), shutting_down (503).",
            ["reason"],
            registry=reg,
        )
        self.download_retries_total = Counter(
            "cliplens_download_retries_total",
            "Downloads retried, by source (gcs, url) and reason: http_429, http_5xx, connection, timeout.",
            ["source", "reason"],
            registry=reg,
        )
        self.model_info = Gauge(
            "cliplens_model_info",
            "The served model (always 1); its labels say which model, runtime, device and dtype, and for "
            "int8 the lowest and mean cosine to float32 measured at start (empty otherwise).",
            ["model", "runtime", "device", "dtype", "random_weights", "int8_cosine_min", "int8_cosine_mean"],
            registry=reg,
        )
        self.cache_requests_total = Counter(
            "cliplens_cache_requests_total",
            "Embedding cache lookups, one per item and tier tried: hit, miss, error (the tier failed or "
            "timed out), bypass (the request sent cache=false, or the tier's circuit is open).",
            ["tier", "result"],
            registry=reg,
        )
        self.cache_writes_total = Counter(
            "cliplens_cache_writes_total",
            "Vectors written to the embedding cache, by tier and result: ok, error, bypass (circuit open).",
            ["tier", "result"],
            registry=reg,
        )
        self.cache_seconds = Histogram(
            "cliplens_cache_seconds",
            "Duration of one embedding cache lookup in one tier.",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.cache_bytes = Gauge(
            "cliplens_cache_bytes", "Bytes held by the in-process embedding cache.", registry=reg
        )
        self.cache_entries = Gauge(
            "cliplens_cache_entries", "Vectors held by the in-process embedding cache.", registry=reg
        )
        self.cache_capacity_bytes = Gauge(
            "cliplens_cache_capacity_bytes",
            "Bound of the in-process embedding cache (CLIPLENS_CACHE_BYTES; 0 = off).",
            registry=reg,
        )
        self.cache_circuit_open = Gauge(
            "cliplens_cache_circuit_open",
            "1 while a cache tier's circuit breaker is open (the tier is bypassed), else 0.",
            ["tier"],
            registry=reg,
        )
        self.storage_up = Gauge(
            "cliplens_storage_up",
            "1 if the storage source passed its last check (start-up, then every 30 s), else 0.",
            ["source"],
            registry=reg,
        )
        self.cpu_pool_busy_seconds = Counter(
            "cliplens_cpu_pool_busy_seconds",
            "Worker-seconds each pool spent running tasks; rate / cliplens_cpu_pool_workers = busy ratio.",
            ["pool"],
            registry=reg,
        )
        self.threads = ThreadsCollector()
        reg.register(self.threads)
        self.event_loop_lag_seconds = Histogram(
            "cliplens_event_loop_lag_seconds",
            "How late the event loop ran a task scheduled every 50 ms: time it was busy with other work.",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self._initialise_series()

    def pool(self, workers: int, name: str) -> MeteredPool:
        """A worker pool of this app, its threads and busy time on the metrics (telemetry/threads.py)."""
        pool = MeteredPool(workers, name, self.cpu_pool_busy_seconds)
        self.threads.watch(pool)
        return pool

    def observe_loop_lag(self, seconds: float) -> None:
        self.event_loop_lag_seconds.observe(seconds)
        self.extremes.observe("cliplens_event_loop_lag", seconds)

    def observe_image_stage(
        self, stage: str, work_s: float | None, queue_s: float, exemplar: Exemplar
    ) -> None:
        """One image finished a stage: its work (None for `embed`, a shared batch) and its wait."""
        self.stage_queue_seconds.labels(stage).observe(queue_s, exemplar)
        self.extremes.observe("cliplens_stage_queue", queue_s, stage)
        if work_s is not None:
            self.image_stage_seconds.labels(stage).observe(work_s, exemplar)
            self.extremes.observe("cliplens_image_stage", work_s, stage)

    def observe_request_stage(self, stage: str, seconds: float, exemplar: Exemplar) -> None:
        self.request_stage_seconds.labels(stage).observe(seconds, exemplar)
        self.extremes.observe("cliplens_request_stage", seconds, stage)

    def observe_request(self, modality: str, seconds: float, exemplar: Exemplar) -> None:
        self.request_seconds.labels(modality).observe(seconds, exemplar)
        self.extremes.observe("cliplens_request", seconds, modality)

    def track_in_flight(self, requests: int, images: int) -> None:
        """Change the in-flight gauges by these deltas; their exact window extremes follow."""
        self._in_flight = (self._in_flight[0] + requests, self._in_flight[1] + images)
        self.requests_in_flight.set(self._in_flight[0])
        self.images_in_flight.set(self._in_flight[1])
        self.extremes.observe("cliplens_requests_in_flight", self._in_flight[0])
        self.extremes.observe("cliplens_images_in_flight", self._in_flight[1])

    def _initialise_series(self) -> None:
        """Create every bounded label combination at zero, so rates exist before the first error."""
        for stage in Stage:
            self.request_stage_seconds.labels(stage)
            self.stage_queue_seconds.labels(stage)
        for stage in IMAGE_WORK_STAGES:
            self.image_stage_seconds.labels(stage)
        for rejection in REJECTIONS:
            self.rejected_requests_total.labels(rejection)
        for pool in POOLS:
            self.cpu_pool_busy_seconds.labels(pool)
        for source in DOWNLOAD_SOURCES:
            for reason in RETRY_REASONS:
                self.download_retries_total.labels(source, reason)
        for outcome in OUTCOMES:
            self.images_total.labels(outcome)
        for tier in CACHE_TIERS:
            self.cache_seconds.labels(tier)
            for result in CACHE_LOOKUP_RESULTS:
                self.cache_requests_total.labels(tier, result)
            for result in CACHE_WRITE_RESULTS:
                self.cache_writes_total.labels(tier, result)
        self.cache_circuit_open.labels("redis")
        for modality in Modality:
            self.request_seconds.labels(modality)
            self.embed_batch_size.labels(modality)
            self.embed_batch_seconds.labels(modality)
