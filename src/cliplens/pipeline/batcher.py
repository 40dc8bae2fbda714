"""Cross-request dynamic batching: one model worker owns the model (the `embed` stage).

Preprocessed images from every request go into one queue. The worker takes whatever is queued, up
to `max_batch`, and runs one forward pass on its own thread, so the event loop keeps serving. It
waits for a fuller batch (never longer than `max_wait_s`) only while more images are known to be on
their way (each request announces its images with `expect`, and `withdraw`s one that fails before
reaching the model), only while no queued image is the last one its request waits for, and only
while the last forward pass took less time than `max_wait_s`:

- A request is answered when its last image is, so the images that wait are ones whose requests
  wait for later images anyway: a lone image, or the last of a request, never waits for a timer.
- While a forward pass runs, new images simply queue: a model slower than the wait fills its
  batches by itself, and waiting would only leave it idle. A fast model (a GPU, a small model)
  fed one image at a time by the host would run a forward pass per image; the wait gathers them,
  sparing each image the fixed cost of a pass (operator calls, a thread hand-off, a span), CPU
  the decoders need.

Each batch is one `embed batch` span linked to the requests it served; each request's `embed`
span links back to the batches that carried its images.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from opentelemetry.trace import SpanContext, Tracer

from cliplens.pipeline.model import LoadedModel
from cliplens.pipeline.preprocess import Preprocessor
from cliplens.telemetry.metrics import Metrics
from cliplens.telemetry.stages import BatchTiming, StageTiming, model_attributes
from cliplens.vocabulary import Modality, ShuttingDown

log = logging.getLogger(__name__)
_STOPPED = "the model worker has stopped: the service is shutting down"


@dataclass(eq=False, slots=True)
class Expected:
    """The images of one request still on their way to the model (`Batcher.expect`)."""

    remaining: int


@dataclass(eq=False, slots=True)
class _Pending:
    image: torch.Tensor
    timing: StageTiming
    request: SpanContext
    expected: Expected
    future: asyncio.Future[np.ndarray]


class Batcher:
    """The model worker and its queue; see the module docstring."""

    def __init__(
        self,
        model: LoadedModel,
        preprocessor: Preprocessor,
        tracer: Tracer,
        metrics: Metrics,
        max_batch: int,
        max_wait_s: float,
    ) -> None:
        self.model = model
        self._described = model_attributes(model.describe())
        self.preprocessor = preprocessor
        self.tracer = tracer
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: deque[_Pending] = deque()
        self._upstream = 0
        self._wakeup = asyncio.Event()
        self._worked_s = 0.0
        """How long the last forward pass of images took (wall time, as the event loop saw it)."""
        self._thread = metrics.pool(1, "model")
        self._worker: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="cliplens-model-worker")

    async def close(self) -> None:
        """Stop the worker; images still queued fail with ShuttingDown (503)."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                pending.future.set_exception(ShuttingDown(_STOPPED))
        self._thread.shutdown(wait=True)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def expect(self, count: int) -> Expected:
        """A request's `count` images are on their way (loading, decoding, preprocessing)."""
        self._upstream += count
        return Expected(count)

    def withdraw(self, expected: Expected) -> None:
        """One of the request's images will not come after all (it failed, or was a cache hit)."""
        self._arrived(expected)
        self._wakeup.set()  # it may have been what a queued image of its request was waiting for

    async def embed(
        self, image: torch.Tensor, timing: StageTiming, request: SpanContext, expected: Expected
    ) -> np.ndarray:
        """Queue one preprocessed image of the request `expected` and wait for its vector."""
        if self._closed:
            raise ShuttingDown(_STOPPED)
        self._arrived(expected)
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(image, timing, request, expected, future))
        self._wakeup.set()
        return await future

    def _arrived(self, expected: Expected) -> None:
        if expected.remaining > 0:
            expected.remaining -= 1
            self._upstream -= 1

    def _worth_waiting(self) -> bool:
        """More images are on their way, the batch has room, no queued image is the last one its
        request waits for (the queue is at most `max_batch` long here), and the model is faster
        than the wait (see the module docstring)."""
        return (
            len(self._queue) < self.max_batch
            and self._upstream > 0
            and all(item.expected.remaining for item in self._queue)
            and self._worked_s < self.max_wait_s
        )

    async def embed_texts(
        self, tokens: torch.Tensor, timings: Sequence[StageTiming], request: SpanContext
    ) -> np.ndarray:
        """Embed tokenised texts on the model thread, in chunks of `max_batch`, between image batches."""
        loop = asyncio.get_running_loop()
        chunks = []
        for start in range(0, len(tokens), self.max_batch):
            chunk = tokens[start : start + self.max_batch]
            batch = BatchTiming(
                self.tracer, self.metrics, Modality.TEXT, len(chunk), [request], self._described
            )
            chunks.append(await loop.run_in_executor(self._thread, self._forward_texts, batch, chunk))
            for timing in timings[start : start + self.max_batch]:
                timing.start(at=batch.started_ns)
                timing.end(at=batch.ended_ns)
                timing.link = batch.span_context
        return np.concatenate(chunks)

    def _forward_texts(self, batch: BatchTiming, tokens: torch.Tensor) -> np.ndarray:
        with batch.measuring():
            return self.model.encode_texts(tokens)

    def _forward_images(self, batch: BatchTiming, items: list[_Pending]) -> np.ndarray:
        with batch.measuring():
            tensor = self.preprocessor.normalize([item.image for item in items], self.model.dtype)
            return self.model.encode_images(tensor)

    async def _gather(self) -> list[_Pending]:
        """Wait for work, then linger (at most max_wait_s) while `_worth_waiting`."""
        while not self._queue:
            self._wakeup.clear()
            await self._wakeup.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.max_wait_s
        while self._worth_waiting():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        count = min(self.max_batch, len(self._queue))
        return [self._queue.popleft() for _ in range(count)]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = await self._gather()
            items = [item for item in items if not item.future.done()]
            if not items:
                continue
            started = loop.time()
            batch = BatchTiming(
                self.tracer,
                self.metrics,
                Modality.IMAGE,
                len(items),
                [i.request for i in items],
                self._described,
            )
            try:
                vectors = await loop.run_in_executor(self._thread, self._forward_images, batch, items)
            except asyncio.CancelledError:
                for item in items:
                    if not item.future.done():
                        item.future.set_exception(ShuttingDown(_STOPPED))
                raise
            except Exception as exc:
                log.exception("model forward pass failed", extra={"batch_size": len(items)})
                for item in items:
                    item.timing.end(at=batch.ended_ns or None)
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            finally:
                self._worked_s = loop.time() - started
            for item, vector in zip(items, vectors, strict=True):
                item.timing.start(at=batch.started_ns)
                item.timing.end(at=batch.ended_ns)
                item.timing.link = batch.span_context
                if not item.future.done():
                    item.future.set_result(vector)
