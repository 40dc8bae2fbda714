"""The orchestration: every item of a request streams load -> decode -> preprocess -> embed.

Each image moves to its next stage as soon as its previous one ends (no "download all, then decode
all"), so a slow object delays only itself. Work is bounded process-wide, never per request:
downloads by a semaphore (`max_downloads`), decode and preprocess by one thread pool
(`cpu_workers`), the model by the one batcher. Under load, images wait for those slots, and the
wait is measured apart from the work (see telemetry/stages.py). A failed item becomes an error
entry with its code; it never fails the others.

Admission control bounds the work: a request whose items (images or texts) would take the service
past `max_images_in_flight` is refused at once (`Overloaded`, 429 at the HTTP edge) instead of
queueing, and a request larger than that bound alone is refused with 413. Memory is bounded in
bytes by the memory budget (pipeline/budget.py): an image waits before its download while the
budget is full and before its decode until its predicted pixels fit. Texts are capped in length,
tokenised on their own one-thread lane, and bound by the same admission and deadline.
Each request has a deadline: items not done by then get `timeout`, and the rest is returned; a
drain (SIGTERM) brings every deadline forward to just inside the grace period.

With the embedding cache on (pipeline/cache.py), an item whose storage can say which bytes it
names (a GCS object's generation, a file's status) is looked up before its load (stage `cache`);
inline bytes and URL images are hashed and looked up after theirs. A hit is the item's vector: it
crosses no other stage. Every vector made is written to the cache, even when the request skipped
lookups.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import aiohttp
import numpy as np
import torch
from opentelemetry.trace import SpanContext, Tracer

from cliplens.machine import usable_cpus
from cliplens.pipeline.batcher import Batcher, Expected
from cliplens.pipeline.budget import MemoryBudget, return_free_memory
from cliplens.pipeline.cache import EmbeddingCache, content_key, model_fingerprint
from cliplens.pipeline.decode import DecodedImage, decode_cost, decode_image, decode_on_device
from cliplens.pipeline.model import LoadedModel, load_model
from cliplens.pipeline.preprocess import Preprocessor
from cliplens.pipeline.references import GcsReference, LocalReference, Reference, ReferenceParser
from cliplens.pipeline.sources import Content, GcsSource, ImageSources, LocalDirectorySource, UrlSource
from cliplens.pipeline.storage_health import StorageHealth, require_image_root
from cliplens.pipeline.urls import UrlPolicy
from cliplens.settings import Settings
from cliplens.telemetry.device import GpuCollector
from cliplens.telemetry.loop import LoopLagMonitor
from cliplens.telemetry.metrics import Metrics
from cliplens.telemetry.stages import RequestTimeline, ServerTiming, StageTiming, exemplar_for
from cliplens.vocabulary import (
    ErrorCode,
    ItemError,
    Modality,
    Overloaded,
    RequestError,
    RequestErrorCode,
    Source,
    Stage,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")
INLINE_HASH_ON_LOOP_BYTES = 256 * 1024
"""Inline images up to this size are hashed for the cache on the event loop (tens of microseconds);
larger ones in a worker thread (SHA-256 releases the GIL)."""
IDLE_BEFORE_TRIM_S = 1.0
"""How long nothing may be in flight before the free heap is handed back (`return_free_memory`):
malloc_trim holds the allocator's locks for up to a few hundred milliseconds, so every thread that
allocates meanwhile, the event loop's included, waits it out. Trimming the moment the service goes
idle did that between every two bursts of quick requests (cache hits): probes took 190 ms."""
LATE_LOOP_S = 0.005
"""A load during which the event loop was this late (or later) says so on its span event
(`loop_lag_ms`): the image's download may look slow only because the loop was busy."""
DRAIN_MARGIN_S = 1.0
"""On SIGTERM, in-flight work is cut this long before the grace period ends, so that every request
still gets its answer (unfinished items: `timeout`) before the server stops waiting for it."""

Item = str | Reference


@dataclass(frozen=True, slots=True)
class ItemResult:
    """What became of one item: a vector or an error, at its position in the request."""

    index: int
    input: str
    vector: np.ndarray | None = None
    error: ItemError | None = None
    tokens: int = 0
    cached: bool = False
    """The vector came from the embedding cache."""
    truncated: bool = False
    """A text cut to fit (`truncate`): the vector is of its beginning."""


@dataclass(frozen=True, slots=True)
class _Text:
    """A text accepted for tokenising: as sent (`text`), and as tokenised (`kept`)."""

    index: int
    text: str
    kept: str
    cut: bool
    """`kept` is its beginning only (more characters than CLIPLENS_MAX_TEXT_CHARS)."""


@dataclass(frozen=True, slots=True)
class Embeddings:
    """The results of one request, in input order, and its stage timings."""

    results: list[ItemResult]
    timing: ServerTiming
    per_image: dict[int, dict[str, tuple[float, float]]]
    """{index: {stage: (queue_ms, work_ms)}}: the same stamps as the spans and histograms."""

    @property
    def cache_hits(self) -> int:
        return sum(result.cached for result in self.results)


class EmbeddingService:
    """Owns the model worker, the CPU executor, the download slots and the storage session."""

    def __init__(
        self,
        settings: Settings,
        model: LoadedModel,
        tracer: Tracer,
        metrics: Metrics,
        http_session: aiohttp.ClientSession | None = None,
        cache: EmbeddingCache | None = None,
        loop_lag: LoopLagMonitor | None = None,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.model = model
        self.tracer = tracer
        self.metrics = metrics
        self.cpu_workers = settings.cpu_workers or usable_cpus()
        self.executor = metrics.pool(self.cpu_workers, "cpu")
        self.text_executor = metrics.pool(1, "text")
        """Texts are tokenised on their own lane, so they can never occupy every decode worker."""
        self.budget = MemoryBudget(settings.memory_budget_bytes, metrics.memory_reserved_bytes.set)
        metrics.memory_budget_bytes.set(settings.memory_budget_bytes)
        self._work: set[asyncio.Future[object]] = set()
        """Item tasks in flight (texts: one per request), which a drain cuts before its grace ends."""
        self._cut = False
        self._loop = asyncio.get_running_loop()
        self._loop.set_default_executor(metrics.pool(min(32, self.cpu_workers + 4), "io"))
        """File reads and base64 decoding (`asyncio.to_thread`): asyncio's default size, named."""
        self._body_bytes = 0
        """Bytes of the request bodies being served, part of `budget.used`."""
        self._idle_since: float | None = None
        """When the last item finished, while none is in flight (None while busy)."""
        self._trim: asyncio.TimerHandle | None = None
        self.download_slots = asyncio.Semaphore(settings.max_downloads)
        self.preprocessor = Preprocessor(model.preprocess, model.device)
        urls = UrlPolicy(settings.url_hosts, settings.url_allow_http, settings.url_allow_loopback)
        self.parser = ReferenceParser(
            buckets=settings.buckets,
            default_bucket=settings.default_bucket,
            has_local_root=settings.image_root is not None,
            max_image_bytes=settings.max_image_bytes,
            urls=urls,
        )
        self.images_in_flight = 0
        metrics.images_in_flight_limit.set(settings.max_images_in_flight)
        self._http_session = http_session
        local = None
        if settings.image_root:
            local = LocalDirectorySource(settings.image_root, settings.max_image_bytes)
        gcs = None
        if http_session is not None:
            gcs = GcsSource(
                http_session,
                settings.max_image_bytes,
                settings.gcs_emulator_host,
                timeout_s=settings.download_timeout_s,
                retries=settings.download_retries,
                on_retry=lambda reason: metrics.download_retries_total.labels(Source.GCS, reason).inc(),
            )
        url = None
        if urls.enabled:
            url = UrlSource(
                urls,
                settings.max_image_bytes,
                timeout_s=settings.download_timeout_s,
                retries=settings.download_retries,
                on_retry=lambda reason: metrics.download_retries_total.labels(Source.URL, reason).inc(),
                connections=settings.max_downloads,
            )
        self.sources = ImageSources(local, gcs, settings.max_image_bytes, url)
        self.loop_lag = loop_lag
        self.storage_health = StorageHealth(metrics, settings.image_root, gcs, settings.default_bucket)
        self.storage_health.start()
        self.batcher = Batcher(
            model, self.preprocessor, tracer, metrics, settings.max_batch, settings.batch_wait_ms / 1000.0
        )
        self.batcher.start()

    @classmethod
    async def start(
        cls, settings: Settings, tracer: Tracer, metrics: Metrics, loop_lag: LoopLagMonitor | None = None
    ) -> EmbeddingService:
        """Check the image directory, size torch's threads, load the model (off the event loop) and
        open the storage session."""
        if settings.image_root is not None:
            require_image_root(settings.image_root)
        # load_model lowers this to one for a model too small to split (size_model_threads)
        torch.set_num_threads(settings.model_threads or usable_cpus())
        model = await asyncio.to_thread(load_model, settings)
        session = None
        if settings.default_bucket or settings.allowed_buckets:
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=settings.max_downloads))
        described = model.describe()
        metrics.model_info.labels(
            model=model.id,
            runtime=model.runtime,
            device=str(model.device),
            dtype=model.dtype_name,
            random_weights=str(model.random_weights).lower(),
            int8_cosine_min=str(described.get("int8_cosine_min", "")),
            int8_cosine_mean=str(described.get("int8_cosine_mean", "")),
        ).set(1)
        if model.device.type == "cuda":
            index = model.device.index if model.device.index is not None else torch.cuda.current_device()
            metrics.registry.register(GpuCollector([index]))
        cache = None
        if settings.cache_bytes or settings.cache_url:
            fingerprint = await asyncio.to_thread(model_fingerprint, model, settings)
            cache = EmbeddingCache(settings, fingerprint, metrics)
            log.info(
                "embedding cache on",
                extra={"tiers": cache.tiers, "bytes": settings.cache_bytes, "shared": cache.shared_url},
            )
        return cls(settings, model, tracer, metrics, session, cache, loop_lag)

    async def close(self) -> None:
        if self._trim is not None:
            self._trim.cancel()
        await self.storage_health.stop()
        await self.batcher.close()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.text_executor.shutdown(wait=True, cancel_futures=True)
        if self._http_session is not None:
            await self._http_session.close()
        await self.sources.close()
        if self.cache is not None:
            await self.cache.close()

    def check_capacity(self, body_bytes: int = 0) -> None:
        """Before a body is read: raise Overloaded when no item at all can be admitted now, or when
        the body (its Content-Length) would take request bodies past half the memory budget (the
        other half is kept for the images' own work, which waits for it instead of failing); a
        body larger than that half alone can never be served: 413."""
        if self.images_in_flight >= self.settings.max_images_in_flight:
            raise self._overloaded(
                f"{self.images_in_flight} items in flight, the limit (CLIPLENS_MAX_IMAGES_IN_FLIGHT)"
            )
        if body_bytes > self.budget.limit // 2:
            raise RequestError(
                RequestErrorCode.BODY_TOO_LARGE,
                f"a body of {body_bytes / 2**20:.0f} MiB can never fit in half the memory budget "
                f"({self.budget.limit / 2**20:.0f} MiB, CLIPLENS_MEMORY_BUDGET_BYTES)",
            )
        if self._body_bytes + body_bytes > self.budget.limit // 2:
            raise self._overloaded(
                f"request bodies in flight hold {self._body_bytes / 2**20:.0f} MiB; this one's "
                f"{body_bytes / 2**20:.0f} MiB would pass half the memory budget "
                f"({self.budget.limit / 2**20:.0f} MiB, CLIPLENS_MEMORY_BUDGET_BYTES)"
            )

    def _admit(self, count: int, body_bytes: int) -> None:
        """Count a request's items and body in, or refuse it: no request may pass the bound, alone
        (413: it could never be served) or together with the others (429: retry later)."""
        limit = self.settings.max_images_in_flight
        if count > limit:
            raise RequestError(
                RequestErrorCode.TOO_MANY_ITEMS,
                f"{count} items is more than the {limit} this service holds in flight at once "
                "(CLIPLENS_MAX_IMAGES_IN_FLIGHT); split the request",
            )
        if self.images_in_flight + count > limit:
            raise self._overloaded(
                f"{self.images_in_flight} items in flight; {count} more would pass {limit}"
            )
        self.check_capacity(body_bytes)
        self.images_in_flight += count
        self._idle_since = None
        self._body_bytes += body_bytes
        self.budget.take(body_bytes)
        self.metrics.track_in_flight(1, count)

    def _overloaded(self, reason: str) -> Overloaded:
        self.metrics.rejected_requests_total.labels(RequestErrorCode.OVERLOADED).inc()
        return Overloaded(reason)

    def _release(self, count: int, body_bytes: int) -> None:
        self.images_in_flight -= count
        self._body_bytes -= body_bytes
        self.budget.give(body_bytes)
        if self.images_in_flight == 0:
            self._idle_since = time.monotonic()
            if self._trim is None:
                self._trim = self._loop.call_later(IDLE_BEFORE_TRIM_S, self._trim_when_idle)
        self.metrics.track_in_flight(-1, -count)

    def _trim_when_idle(self) -> None:
        """Hand the free heap back once the service has been idle for `IDLE_BEFORE_TRIM_S`."""
        self._trim = None
        if self._idle_since is None:
            return  # busy again: the next time it goes idle schedules a new trim
        idle_s = time.monotonic() - self._idle_since
        if idle_s < IDLE_BEFORE_TRIM_S:
            self._trim = self._loop.call_later(IDLE_BEFORE_TRIM_S - idle_s, self._trim_when_idle)
            return
        self._loop.run_in_executor(None, return_free_memory)

    def drain(self, grace_s: float) -> None:
        """SIGTERM: cut the work in flight `DRAIN_MARGIN_S` before the grace period ends, so each
        request is answered (its unfinished items `timeout`) while the server still waits for it.
        Safe to call from a signal handler."""
        delay = max(0.0, grace_s - DRAIN_MARGIN_S)
        self._loop.call_soon_threadsafe(self._loop.call_later, delay, self._cut_work)

    def _cut_work(self) -> None:
        self._cut = True
        for task in list(self._work):
            task.cancel()

    def _track(self, task: asyncio.Future[_T]) -> asyncio.Future[_T]:
        if self._cut:
            task.cancel()
        self._work.add(task)  # type: ignore[arg-type]
        task.add_done_callback(self._work.discard)
        return task

    def _timeout(self) -> ItemError:
        if self._cut:
            return ItemError(ErrorCode.TIMEOUT, "not done when the service shut down (SIGTERM)")
        return ItemError(
            ErrorCode.TIMEOUT,
            f"not done within the request deadline of {self.settings.request_timeout_s:g} s",
        )

    async def embed_images(
        self, items: Sequence[Item], request: SpanContext, body_bytes: int = 0, read_cache: bool = True
    ) -> Embeddings:
        """Embed every item concurrently, within the deadline; the results keep the input order.

        Raises Overloaded when the admission bound would be passed (RequestError when the request
        alone is larger than the bound); `body_bytes` is held in the memory budget until the end.
        With `read_cache` false no item is looked up in the cache (each vector is still written).
        """
        self._admit(len(items), body_bytes)
        if self.cache is not None and not read_cache:
            self.cache.bypass(len(items))
        timeline = RequestTimeline(self.metrics, Modality.IMAGE, request)
        deadline = time.monotonic() + self.settings.request_timeout_s
        try:
            self.metrics.request_images.observe(len(items), exemplar_for(request))
            expected = self.batcher.expect(len(items))
            work = (
                self._embed_one(index, item, timeline, request, deadline, expected, read_cache)
                for index, item in enumerate(items)
            )
            tasks = [self._track(asyncio.ensure_future(coroutine)) for coroutine in work]
            try:
                await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            results = [
                self._result_of(task, index, item)
                for index, (task, item) in enumerate(zip(tasks, items, strict=True))
            ]
            timing = timeline.finish(self.tracer)
        finally:
            self._release(len(items), body_bytes)
        exemplar = exemplar_for(request)
        for result in results:
            outcome = result.error.code.value if result.error else "ok"
            self.metrics.images_total.labels(outcome).inc(1, exemplar)
        return Embeddings(results, timing, timeline.per_image())

    def _result_of(self, task: asyncio.Future[ItemResult], index: int, item: Item) -> ItemResult:
        if not task.cancelled() and task.exception() is None:
            return task.result()
        label = item if isinstance(item, str) else str(item)
        if task.cancelled():
            return ItemResult(index, label, error=self._timeout())
        raise task.exception()  # type: ignore[misc]

    async def embed_texts(
        self,
        texts: Sequence[str],
        request: SpanContext,
        truncate: bool = False,
        body_bytes: int = 0,
        read_cache: bool = True,
    ) -> Embeddings:
        """Embed texts with the CLIP text tower: tokenise on the text lane, then the model thread.

        Texts follow the images' rules: admitted against the same bound and cut at the same
        deadline. A text must fit twice: in characters, checked before the (quadratic) tokenizer
        sees it, and in the model's context, in tokens. A text that does not is the item error
        `text_too_long` naming its length, or, when `truncate` is set, is cut to fit (its result
        says so); it is never cut silently.
        """
        self._admit(len(texts), body_bytes)
        if self.cache is not None and not read_cache:
            self.cache.bypass(len(texts))
        timeline = RequestTimeline(self.metrics, Modality.TEXT, request, self.settings.trace_text)
        deadline = time.monotonic() + self.settings.request_timeout_s
        limit = self.settings.max_text_chars
        results: dict[int, ItemResult] = {}
        accepted: list[_Text] = []
        for index, text in enumerate(texts):
            if len(text) <= limit or truncate:
                accepted.append(_Text(index, text, text[:limit], cut=len(text) > limit))
                continue
            message = (
                f"{len(text)} characters is more than the {limit} accepted (CLIPLENS_MAX_TEXT_CHARS); "
                "send `truncate: true` to embed its beginning"
            )
            results[index] = ItemResult(index, text, error=ItemError(ErrorCode.TEXT_TOO_LONG, message))
        try:
            if accepted:
                work = self._track(
                    asyncio.ensure_future(
                        self._embed_accepted(accepted, timeline, request, read_cache, truncate)
                    )
                )
                await asyncio.wait([work], timeout=max(0.0, deadline - time.monotonic()))
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
                if work.cancelled():
                    results.update(
                        (t.index, ItemResult(t.index, t.text, error=self._timeout())) for t in accepted
                    )
                else:
                    results.update((r.index, r) for r in work.result())
            timing = timeline.finish(self.tracer)
        finally:
            self._release(len(texts), body_bytes)
        self.metrics.texts_total.inc(sum(1 for r in results.values() if r.vector is not None))
        return Embeddings([results[i] for i in range(len(texts))], timing, timeline.per_image())

    async def _embed_accepted(
        self,
        texts: Sequence[_Text],
        timeline: RequestTimeline,
        request: SpanContext,
        read_cache: bool,
        truncate: bool,
    ) -> list[ItemResult]:
        tokenize = timeline.enter_all(Stage.PREPROCESS, len(texts))
        tokens = await self._on_cpu(
            tokenize, self.model.tokenize, [text.kept for text in texts], executor=self.text_executor
        )
        context = self.model.context_length
        results: list[ItemResult] = []
        rows: list[int] = []  # the texts that fit (or may be cut to fit)
        for row, text in enumerate(texts):
            if tokens.lengths[row] <= context or truncate:
                rows.append(row)
                continue
            message = (
                f"{tokens.lengths[row]} tokens is more than the {context} the model reads; "
                "send `truncate: true` to embed its beginning"
            )
            results.append(
                ItemResult(text.index, text.text, error=ItemError(ErrorCode.TEXT_TOO_LONG, message))
            )
        if not rows:
            return results
        ids = tokens.ids[rows]
        keys: list[str] = []
        found: dict[int, np.ndarray] = {}
        if self.cache is not None:  # texts are keyed by their token ids, looked up in one batch
            with timeline.enter_all(Stage.CACHE, len(rows)).working() as lookup:
                keys = [self.cache.key(content_key("text", row.tobytes())) for row in ids.numpy()]
                if read_cache:
                    answers = await self.cache.get_many(keys)
                    found = {at: vector for at, (vector, _) in enumerate(answers) if vector is not None}
                    lookup.attributes.update(hits=len(found), misses=len(keys) - len(found))
        todo = [at for at in range(len(rows)) if at not in found]
        if todo:
            timings = [
                timeline.enter(texts[rows[at]].index, Stage.EMBED, texts[rows[at]].kept) for at in todo
            ]
            vectors = await self.batcher.embed_texts(ids[todo], timings, request)
            if self.cache is not None:
                self.cache.put_many([(keys[at], vector) for at, vector in zip(todo, vectors, strict=True)])
            found.update(zip(todo, vectors, strict=True))
        made = set(todo)
        for at, row in enumerate(rows):
            text = texts[row]
            results.append(
                ItemResult(
                    text.index,
                    text.text,
                    found[at],
                    tokens=min(tokens.lengths[row], context),
                    cached=at not in made,
                    truncated=text.cut or tokens.lengths[row] > context,
                )
            )
        return results

    async def _on_cpu(
        self,
        timing: StageTiming,
        function: Callable[..., _T],
        *args: object,
        executor: ThreadPoolExecutor | None = None,
    ) -> _T:
        """Run `function` on a bounded executor (by default the decode/preprocess pool); the wait
        for a thread is the stage's queue time."""

        def work() -> _T:
            with timing.working():
                return function(*args)

        return await asyncio.get_running_loop().run_in_executor(executor or self.executor, work)

    def _decode(self, data: bytes) -> DecodedImage:
        min_side, max_pixels = self.model.preprocess.min_side, self.settings.max_image_pixels
        if self.settings.gpu_decode:
            return decode_on_device(data, self.model.device, min_side, max_pixels)
        return decode_image(data, min_side, max_pixels)

    def _decode_and_preprocess(
        self, data: bytes, decode: StageTiming, timeline: RequestTimeline
    ) -> torch.Tensor:
        """On a CPU worker: decode, then preprocess at once, in one hand-off from the event loop
        (two hand-offs cost the loop a wake-up, a future and a queue each, for every image; the
        full-size pixels also never leave the worker). Each stage is still timed on its own: the
        preprocess stage is entered, and so queued, the moment the decode ends."""
        with decode.working():
            decoded = self._decode(data)
        decode.attributes["width"], decode.attributes["height"] = decoded.original_size
        decode.attributes["format"] = decoded.format
        with timeline.enter(decode.index, Stage.PREPROCESS, decode.reference).working():
            return self.preprocessor(decoded.pixels)

    async def _load(self, timing: StageTiming, reference: Reference, deadline: float) -> Content:
        try:
            return await self._read(timing, reference, deadline)
        finally:
            if self.loop_lag is not None and timing.started_ns is not None and timing.ended_ns is not None:
                late_s = self.loop_lag.worst_during(timing.started_ns, timing.ended_ns)
                if late_s >= LATE_LOOP_S:
                    timing.attributes["loop_lag_ms"] = round(late_s * 1e3, 1)

    async def _read(self, timing: StageTiming, reference: Reference, deadline: float) -> Content:
        timing.attributes["source"] = self.sources.source_of(reference).value
        if not self.sources.needs_slot(reference):
            with timing.working():
                content = await self.sources.load(reference, calls=timing.calls)
        else:
            async with self.download_slots:
                # no new bytes come in while the budget is full; as this waits holding its slot,
                # at most `max_downloads` reads are ever under way past a full budget
                await self.budget.room()
                with timing.working():
                    content = await self.sources.load(reference, deadline, timing.calls)
        timing.attributes["bytes"] = len(content.data)
        return content

    async def _look_up(
        self, timing: StageTiming, reference: Reference, content: Content | None, deadline: float, read: bool
    ) -> tuple[str | None, np.ndarray | None]:
        """In the `cache` stage: the item's cache key (from what storage says the reference names
        now, or from the bytes; None when storage cannot say) and, when `read`, its cached vector."""
        assert self.cache is not None
        with timing.working():
            if content is None:
                assert isinstance(reference, (GcsReference, LocalReference))
                identity = await self.sources.identify(reference, deadline, timing.calls)
                if identity is None:
                    return None, None
                digest = content_key(*identity)
            elif len(content.data) <= INLINE_HASH_ON_LOOP_BYTES:
                digest = content_key("bytes", content.data)
            else:
                digest = await asyncio.to_thread(content_key, "bytes", content.data)
            key = self.cache.key(digest)
            if not read:
                return key, None
            vector, tier = (await self.cache.get_many([key]))[0]
            timing.attributes.update(hits=int(tier is not None), misses=int(tier is None))
            if tier is not None:
                timing.attributes["tier"] = tier
            return key, vector

    async def _embed_one(
        self,
        index: int,
        item: Item,
        timeline: RequestTimeline,
        request: SpanContext,
        deadline: float,
        expected: Expected,
        read_cache: bool = True,
    ) -> ItemResult:
        """One item through every stage. Until it reaches the model it is one of the images
        `expected` by the batcher, so every way out before that (cache hit, error, deadline)
        withdraws it."""
        label = item if isinstance(item, str) else str(item)
        try:
            reference = self.parser.parse(item) if isinstance(item, str) else item
        except ItemError as exc:
            self._abandon(timeline.enter(index, Stage.LOAD, label), exc, expected)
            return ItemResult(index, label, error=exc)
        cache = self.cache
        look_up_first = cache is not None and read_cache and self.sources.identifies(reference)
        timing = timeline.enter(index, Stage.CACHE if look_up_first else Stage.LOAD, label)
        queued_for_model = False
        key: str | None = None
        held = pixels_held = 0  # this item's bytes in the memory budget
        try:
            if look_up_first:
                key, vector = await self._look_up(timing, reference, None, deadline, read=True)
                if vector is not None:
                    self.batcher.withdraw(expected)
                    return ItemResult(index, label, vector, cached=True)
                timing = timeline.enter(index, Stage.LOAD, label)
            content = await self._load(timing, reference, deadline)
            data = content.data
            self.budget.take(held := len(data))
            if cache is not None and content.identity is not None:
                key = cache.key(content_key(*content.identity))  # the bytes read, whatever was looked up
            elif cache is not None:
                timing = timeline.enter(index, Stage.CACHE, label)
                key, vector = await self._look_up(timing, reference, content, deadline, read_cache)
                if vector is not None:
                    self.batcher.withdraw(expected)
                    return ItemResult(index, label, vector, cached=True)
            del content
            timing = timeline.enter(index, Stage.DECODE, label)
            cost = decode_cost(data, self.model.preprocess.min_side, self.settings.max_image_pixels)
            await self.budget.reserve_decode(cost)  # waiting here is decode queue time
            pixels_held = cost
            image = await self._loop.run_in_executor(
                self.executor, self._decode_and_preprocess, data, timing, timeline
            )
            del data
            self.budget.give(held)
            self.budget.end_decode(pixels_held)
            held = pixels_held = 0
            self.budget.take(held := image.numel() * image.element_size())
            timing = timeline.enter(index, Stage.EMBED, label)
            queued_for_model = True
            vector = await self.batcher.embed(image, timing, request, expected)
            if cache is not None and key is not None:
                cache.put_many([(key, vector)])
            return ItemResult(index, label, vector)
        except ItemError as exc:
            self._abandon(timing, exc, None if queued_for_model else expected)
            return ItemResult(index, label, error=exc)
        except asyncio.CancelledError:
            error = ItemError(ErrorCode.TIMEOUT, "request deadline")
            self._abandon(timing, error, None if queued_for_model else expected)
            raise
        except Exception as exc:
            if queued_for_model:
                raise
            log.exception("unexpected failure in stage %s", timing.stage, extra={"index": index})
            error = ItemError(ErrorCode.INTERNAL, f"{timing.stage} failed unexpectedly: {type(exc).__name__}")
            self._abandon(timing, error, expected)
            return ItemResult(index, label, error=error)
        finally:
            self.budget.give(held)
            if pixels_held:
                self.budget.end_decode(pixels_held)

    def _abandon(self, timing: StageTiming, error: ItemError, expected: Expected | None) -> None:
        """The item leaves the pipeline early: close its open stage and, unless it already reached
        the model (`expected` None), withdraw it from the images the batcher expects.

        A stage a worker thread is running is left to that thread to close (`end` counts once).
        """
        if timing.started_ns is None:
            timing.start()
            timing.end(error)
        if expected is not None:
            self.batcher.withdraw(expected)
