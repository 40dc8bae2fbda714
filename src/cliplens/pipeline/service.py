"""The orchestration: every item of a request streams load -> decode -> preprocess -> embed.

Each image moves to its next stage as soon as its previous one ends (no "download all, then decode
all"), so a slow object delays only itself. Work is bounded process-wide, never per request:
downloads by a semaphore (`max_downloads`), decode and preprocess by one thread pool
(`cpu_workers`), the model by the one batcher. Under load, images wait for those slots, and the
wait is measured apart from the work (see telemetry/stages.py). A failed item becomes an error
entry with its code; it never fails the others.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import aiohttp
import numpy as np
from opentelemetry.trace import SpanContext, Tracer

from cliplens.pipeline.batcher import Batcher
from cliplens.pipeline.decode import decode_image
from cliplens.pipeline.errors import ErrorCode, ItemError
from cliplens.pipeline.model import LoadedModel, load_model
from cliplens.pipeline.preprocess import Preprocessor
from cliplens.pipeline.references import Reference, ReferenceParser
from cliplens.pipeline.sources import GcsSource, ImageSources, LocalDirectorySource
from cliplens.settings import Settings
from cliplens.telemetry.metrics import Metrics
from cliplens.telemetry.stages import RequestTimeline, ServerTiming, StageTiming, exemplar_for

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


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


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
        self._http_session = http_session
        local = (
            LocalDirectorySource(settings.image_root, settings.max_image_bytes)
            if settings.image_root
            else None
        )
        gcs = None
        if http_session is not None:
            gcs = GcsSource(http_session, settings.max_image_bytes, settings.gcs_emulator_host)
        self.sources = ImageSources(local, gcs, settings.max_image_bytes)
        self.batcher = Batcher(
            model, self.preprocessor, tracer, metrics, settings.max_batch, settings.batch_wait_ms / 1000.0
        )
        self.batcher.start()

    @classmethod
    async def start(cls, settings: Settings, tracer: Tracer, metrics: Metrics) -> EmbeddingService:
        """Load the model (off the event loop) and open the storage session."""
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

    async def embed_images(self, items: Sequence[Item], request: SpanContext) -> Embeddings:
        """Embed every item concurrently; the results keep the input order."""
        timeline = RequestTimeline(self.metrics, "image", request)
        self.metrics.requests_in_flight.inc()
        try:
            self.metrics.request_images.observe(len(items), exemplar_for(request))
            self.batcher.expect(len(items))
            results = await asyncio.gather(
                *(self._embed_one(index, item, timeline, request) for index, item in enumerate(items))
            )
            timing = timeline.finish(self.tracer)
        finally:
            self.metrics.requests_in_flight.dec()
        exemplar = exemplar_for(request)
        for result in results:
            outcome = result.error.code.value if result.error else "ok"
            self.metrics.images_total.labels(outcome).inc(1, exemplar)
        return Embeddings(list(results), timing, timeline.per_image())

    async def embed_texts(self, texts: Sequence[str], request: SpanContext) -> Embeddings:
        """Embed texts with the CLIP text tower: tokenise on the CPU pool, then the model thread."""
        timeline = RequestTimeline(self.metrics, "text", request)
        self.metrics.requests_in_flight.inc()
        try:
            tokenize = timeline.enter(0, "preprocess", f"{len(texts)} texts")
            tokens = await self._on_cpu(tokenize, self.model.tokenize, texts)
            timings = [timeline.enter(i, "embed", text) for i, text in enumerate(texts)]
            vectors = await self.batcher.embed_texts(tokens, timings, request)
            timing = timeline.finish(self.tracer)
        finally:
            self.metrics.requests_in_flight.dec()
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

    async def _load(self, timing: StageTiming, item: Item) -> bytes:
        reference = self.parser.parse(item) if isinstance(item, str) else item
        if not self.sources.needs_slot(reference):
            with timing.working():
                data = await self.sources.read(reference)
        else:
            async with self.download_slots:
                with timing.working():
                    data = await self.sources.read(reference)
        timing.attributes["bytes"] = len(data)
        return data

    async def _embed_one(
        self, index: int, item: Item, timeline: RequestTimeline, request: SpanContext
    ) -> ItemResult:
        label = item if isinstance(item, str) else str(item)
        stage = "load"
        try:
            load = timeline.enter(index, "load", label)
            try:
                data = await self._load(load, item)
            except ItemError as exc:
                if load.ended_ns is None:
                    load.start()
                    load.end(exc)
                raise
            stage = "decode"
            decode = timeline.enter(index, "decode", label)
            decoded = await self._on_cpu(
                decode, decode_image, data, self.model.preprocess.min_side, self.settings.max_image_pixels
            )
            decode.attributes["width"], decode.attributes["height"] = decoded.original_size
            decode.attributes["format"] = decoded.format
            stage = "preprocess"
            preprocess = timeline.enter(index, "preprocess", label)
            image = await self._on_cpu(preprocess, self.preprocessor, decoded.pixels)
            stage = "embed"
            vector = await self.batcher.embed(image, timeline.enter(index, "embed", label), request)
            return ItemResult(index, label, vector)
        except ItemError as exc:
            self.batcher.withdraw()
            return ItemResult(index, label, error=exc)
        except Exception as exc:
            if stage == "embed":
                raise
            self.batcher.withdraw()
            log.exception("unexpected failure in stage %s", stage, extra={"index": index})
            return ItemResult(
                index, label, error=ItemError(ErrorCode.DECODE_FAILED, f"{stage} failed: {exc}")
            )
