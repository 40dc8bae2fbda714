"""The orchestration: every item of a request streams load -> decode -> preprocess -> embed.

Each image moves to its next stage as soon as its previous one ends (no "download all, then decode
all"), so a slow object delays only itself. Work is bounded process-wide, never per request:
downloads by a semaphore (`max_downloads`), decode and preprocess by one thread pool
(`cpu_workers`), the model by the one batcher. Under load, images wait for those slots, and the
wait is measured apart from the work (see telemetry/stages.py). A failed item becomes an error
entry with its code; it never fails the others.

Admission control keeps memory bounded: a request whose images would take the service past
`max_images_in_flight` is refused at once (`Overloaded`, 429 at the HTTP edge) instead of queueing.
Each request has a deadline: items not done by then get `timeout`, and the rest is returned.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiohttp
import numpy as np
import torch
from opentelemetry.trace import SpanContext, Tracer

from cliplens.pipeline.batcher import Batcher
from cliplens.pipeline.decode import DecodedImage, decode_image, decode_on_device
from cliplens.pipeline.model import LoadedModel, load_model
from cliplens.pipeline.preprocess import Preprocessor
from cliplens.pipeline.references import Reference, ReferenceParser
from cliplens.pipeline.sources import GcsSource, ImageSources, LocalDirectorySource
from cliplens.settings import Settings
from cliplens.telemetry.metrics import Metrics
from cliplens.telemetry.stages import RequestTimeline, ServerTiming, StageTiming, exemplar_for
from cliplens.vocabulary import ErrorCode, ItemError, Modality, Overloaded, RequestErrorCode, Stage

log = logging.getLogger(__name__)
_T = TypeVar("_T")

Item = str | Reference


@dataclass(frozen=True, slots=True)
class ItemResult:
    """What became of one item: a vector or an error, at its position in the request."""

    index: int
    input: str
    vector: np.ndarray | None = None
    error: ItemError | None = None
    tokens: int = 0


@dataclass(frozen=True, slots=True)
class Embeddings:
    """The results of one request, in input order, and its stage timings."""

    results: list[ItemResult]
    timing: ServerTiming
    per_image: dict[int, dict[str, tuple[float, float]]]
    """{index: {stage: (queue_ms, work_ms)}}: the same stamps as the spans and histograms."""


def cgroup_cpu_limit(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """Whole cores of a cgroup v2 CPU quota (a container's CPU limit), or None when unlimited."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def usable_cpus() -> int:
    """The cores this process may use: its affinity mask, capped by a container's CPU limit."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        cores = max(1, os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    return min(cores, limit) if limit else cores


class EmbeddingService:
    """Owns the model worker, the CPU executor, the download slots and the storage session."""

    def __init__(
        self,
        settings: Settings,
        model: LoadedModel,
        tracer: Tracer,
        metrics: Metrics,
        http_session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.settings = settings
        self.model = model
        self.tracer = tracer
        self.metrics = metrics
        self.cpu_workers = settings.cpu_workers or usable_cpus()
        self.executor = ThreadPoolExecutor(max_workers=self.cpu_workers, thread_name_prefix="cliplens-cpu")
        self.download_slots = asyncio.Semaphore(settings.max_downloads)
        self.preprocessor = Preprocessor(model.preprocess, model.device)
        self.parser = ReferenceParser(
            buckets=settings.buckets,
            default_bucket=settings.default_bucket,
            has_local_root=settings.image_root is not None,
            max_image_bytes=settings.max_image_bytes,
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
                on_retry=lambda reason: metrics.download_retries_total.labels(reason).inc(),
            )
        self.sources = ImageSources(local, gcs, settings.max_image_bytes)
        self.batcher = Batcher(
            model, self.preprocessor, tracer, metrics, settings.max_batch, settings.batch_wait_ms / 1000.0
        )
        self.batcher.start()

    @classmethod
    async def start(cls, settings: Settings, tracer: Tracer, metrics: Metrics) -> EmbeddingService:
        """Size torch's threads, load the model (off the event loop) and open the storage session."""
        torch.set_num_threads(settings.torch_threads or usable_cpus())
        model = await asyncio.to_thread(load_model, settings)
        session = None
        if settings.default_bucket or settings.allowed_buckets:
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=settings.max_downloads))
        metrics.model_info.labels(
            model.id, str(model.device), model.dtype_name, str(model.random_weights).lower()
        ).set(1)
        return cls(settings, model, tracer, metrics, session)

    async def close(self) -> None:
        await self.batcher.close()
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self._http_session is not None:
            await self._http_session.close()

    def check_capacity(self) -> None:
        """Raise Overloaded when no image at all can be admitted now (checked before a body is read)."""
        limit = self.settings.max_images_in_flight
        if self.images_in_flight >= limit:
            raise self._overloaded(1)

    def _admit(self, count: int) -> None:
        limit = self.settings.max_images_in_flight
        if self.images_in_flight and self.images_in_flight + count > limit:
            raise self._overloaded(count)
        self.images_in_flight += count
        self.metrics.track_in_flight(1, count)

    def _overloaded(self, requested: int) -> Overloaded:
        self.metrics.rejected_requests_total.labels(RequestErrorCode.OVERLOADED).inc()
        return Overloaded(
            f"{self.images_in_flight} images in flight; {requested} more would pass the limit of "
            f"{self.settings.max_images_in_flight}"
        )

    def _release(self, count: int) -> None:
        self.images_in_flight -= count
        self.metrics.track_in_flight(-1, -count)

    async def embed_images(self, items: Sequence[Item], request: SpanContext) -> Embeddings:
        """Embed every item concurrently, within the deadline; the results keep the input order.

        Raises Overloaded when the admission bound would be passed.
        """
        self._admit(len(items))
        timeline = RequestTimeline(self.metrics, Modality.IMAGE, request)
        deadline = time.monotonic() + self.settings.request_timeout_s
        try:
            self.metrics.request_images.observe(len(items), exemplar_for(request))
            self.batcher.expect(len(items))
            tasks = [
                asyncio.ensure_future(self._embed_one(index, item, timeline, request, deadline))
                for index, item in enumerate(items)
            ]
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
            self._release(len(items))
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
            message = f"not done within the request deadline of {self.settings.request_timeout_s:g} s"
            return ItemResult(index, label, error=ItemError(ErrorCode.TIMEOUT, message))
        raise task.exception()  # type: ignore[misc]

    async def embed_texts(self, texts: Sequence[str], request: SpanContext) -> Embeddings:
        """Embed texts with the CLIP text tower: tokenise on the CPU pool, then the model thread."""
        timeline = RequestTimeline(self.metrics, Modality.TEXT, request)
        self.metrics.track_in_flight(1, 0)
        try:
            tokenize = timeline.enter(0, Stage.PREPROCESS, f"{len(texts)} texts")
            tokens = await self._on_cpu(tokenize, self.model.tokenize, texts)
            timings = [timeline.enter(i, Stage.EMBED, text) for i, text in enumerate(texts)]
            vectors = await self.batcher.embed_texts(tokens, timings, request)
            timing = timeline.finish(self.tracer)
        finally:
            self.metrics.track_in_flight(-1, 0)
        self.metrics.texts_total.inc(len(texts))
        counts = (tokens != 0).sum(dim=1).tolist()
        results = [ItemResult(i, text, vectors[i], tokens=int(counts[i])) for i, text in enumerate(texts)]
        return Embeddings(results, timing, timeline.per_image())

    async def _on_cpu(self, timing: StageTiming, function: Callable[..., _T], *args: object) -> _T:
        """Run `function` on the bounded executor; the wait for a thread is the stage's queue time."""

        def work() -> _T:
            with timing.working():
                return function(*args)

        return await asyncio.get_running_loop().run_in_executor(self.executor, work)

    def _decode(self, data: bytes) -> DecodedImage:
        min_side, max_pixels = self.model.preprocess.min_side, self.settings.max_image_pixels
        if self.settings.gpu_decode:
            return decode_on_device(data, self.model.device, min_side, max_pixels)
        return decode_image(data, min_side, max_pixels)

    async def _load(self, timing: StageTiming, item: Item, deadline: float) -> bytes:
        reference = self.parser.parse(item) if isinstance(item, str) else item
        if not self.sources.needs_slot(reference):
            with timing.working():
                data = await self.sources.read(reference)
        else:
            async with self.download_slots:
                with timing.working():
                    data = await self.sources.read(reference, deadline)
        timing.attributes["bytes"] = len(data)
        return data

    async def _embed_one(
        self, index: int, item: Item, timeline: RequestTimeline, request: SpanContext, deadline: float
    ) -> ItemResult:
        """One item through every stage. Until it reaches the model it is `expect`ed by the batcher,
        so every way out before that (error, deadline) withdraws it."""
        label = item if isinstance(item, str) else str(item)
        timing = timeline.enter(index, Stage.LOAD, label)
        queued_for_model = False
        try:
            data = await self._load(timing, item, deadline)
            timing = timeline.enter(index, Stage.DECODE, label)
            decoded = await self._on_cpu(timing, self._decode, data)
            timing.attributes["width"], timing.attributes["height"] = decoded.original_size
            timing.attributes["format"] = decoded.format
            timing = timeline.enter(index, Stage.PREPROCESS, label)
            image = await self._on_cpu(timing, self.preprocessor, decoded.pixels)
            timing = timeline.enter(index, Stage.EMBED, label)
            queued_for_model = True
            vector = await self.batcher.embed(image, timing, request)
            return ItemResult(index, label, vector)
        except ItemError as exc:
            self._abandon(timing, exc, queued_for_model)
            return ItemResult(index, label, error=exc)
        except asyncio.CancelledError:
            self._abandon(timing, ItemError(ErrorCode.TIMEOUT, "request deadline"), queued_for_model)
            raise
        except Exception as exc:
            if queued_for_model:
                raise
            log.exception("unexpected failure in stage %s", timing.stage, extra={"index": index})
            error = ItemError(ErrorCode.DECODE_FAILED, f"{timing.stage} failed: {exc}")
            self._abandon(timing, error, queued_for_model)
            return ItemResult(index, label, error=error)

    def _abandon(self, timing: StageTiming, error: ItemError, queued_for_model: bool) -> None:
        """The item leaves the pipeline early: close its open stage and release its model slot.

        A stage a worker thread is running is left to that thread to close (`end` counts once).
        """
        if timing.started_ns is None:
            timing.start()
            timing.end(error)
        if not queued_for_model:
            self.batcher.withdraw()
