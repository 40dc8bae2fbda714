"""The model worker: batches across requests, never above the maximum, never holding a lone image."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest
import torch
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cliplens.pipeline.batcher import Batcher, Expected
from cliplens.pipeline.preprocess import PreprocessConfig, Preprocessor
from cliplens.telemetry.metrics import Metrics
from cliplens.telemetry.stages import RequestTimeline
from cliplens.vocabulary import Modality, Stage


class RecordingModel:
    """Stands in for LoadedModel: returns each image's mean pixel, and records batch sizes."""

    dtype = torch.float32

    def __init__(self, delay_s: float = 0.0) -> None:
        self.batches: list[int] = []
        self.delay_s = delay_s

    def describe(self) -> dict[str, str | float]:
        return {"runtime": "recording", "dtype": "float32", "int8_cosine_min": 0.5}

    def encode_images(self, batch: torch.Tensor) -> np.ndarray:
        self.batches.append(int(batch.shape[0]))
        time.sleep(self.delay_s)
        return batch.mean(dim=(1, 2, 3), keepdim=False).numpy()[:, None]


def image(value: int) -> torch.Tensor:
    return torch.full((3, 4, 4), value, dtype=torch.uint8)


def make(
    model: RecordingModel, max_batch: int, wait_s: float
) -> tuple[Batcher, InMemorySpanExporter, Metrics]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    metrics = Metrics()
    preprocessor = Preprocessor(PreprocessConfig(size=(4, 4)), torch.device("cpu"))
    batcher = Batcher(model, preprocessor, provider.get_tracer("t"), metrics, max_batch, wait_s)  # type: ignore[arg-type]
    return batcher, exporter, metrics


async def _request(
    batcher: Batcher, metrics: Metrics, values: list[int], tracer_provider: TracerProvider
) -> list[float]:
    tracer = tracer_provider.get_tracer("t")
    with tracer.start_as_current_span("request") as span:
        timeline = RequestTimeline(metrics, Modality.IMAGE, span.get_span_context())
        expected = batcher.expect(len(values))
        vectors = await asyncio.gather(
            *(
                batcher.embed(
                    image(v), timeline.enter(i, Stage.EMBED, str(v)), span.get_span_context(), expected
                )
                for i, v in enumerate(values)
            )
        )
    return [float(v[0]) for v in vectors]


Send = Callable[[int, Expected], "asyncio.Future[np.ndarray]"]


@contextlib.asynccontextmanager
async def running(
    model: RecordingModel, max_batch: int, wait_s: float
) -> AsyncIterator[tuple[Batcher, Send]]:
    """A started batcher, and `send(value, expected)`: queue image(value) as one of the images
    `expected` (every image under one request span), its vector a future."""
    batcher, _, metrics = make(model, max_batch=max_batch, wait_s=wait_s)
    batcher.start()
    try:
        with TracerProvider().get_tracer("t").start_as_current_span("request") as span:
            ctx = span.get_span_context()
            timeline = RequestTimeline(metrics, Modality.IMAGE, ctx)

            def send(value: int, expected: Expected) -> asyncio.Future[np.ndarray]:
                timing = timeline.enter(value, Stage.EMBED, str(value))
                return asyncio.ensure_future(batcher.embed(image(value), timing, ctx, expected))

            yield batcher, send
    finally:
        await batcher.close()


def test_batches_mix_requests_and_respect_the_maximum() -> None:
    model = RecordingModel(delay_s=0.05)

    async def scenario() -> list[list[float]]:
        batcher, _, metrics = make(model, max_batch=4, wait_s=0.05)
        batcher.start()
        try:
            provider = TracerProvider()
            return await asyncio.gather(
                *(_request(batcher, metrics, [r * 10 + i for i in range(3)], provider) for r in range(4))
            )
        finally:
            await batcher.close()

    results = asyncio.run(scenario())
    assert sum(model.batches) == 12
    assert max(model.batches) <= 4
    assert any(size > 3 for size in model.batches), model.batches
    for values in results:
        assert len(values) == 3
        assert values == sorted(values)


def test_a_lone_request_is_not_held_for_the_batch_wait() -> None:
    model = RecordingModel()

    async def scenario() -> float:
        batcher, _, metrics = make(model, max_batch=32, wait_s=30.0)
        batcher.start()
        try:
            started = time.perf_counter()
            await _request(batcher, metrics, [7], TracerProvider())
            return time.perf_counter() - started
        finally:
            await batcher.close()

    assert asyncio.run(scenario()) < 10.0
    assert model.batches == [1]


def test_the_worker_waits_for_announced_images_up_to_the_maximum() -> None:
    model = RecordingModel()

    async def scenario() -> None:
        batcher, _, metrics = make(model, max_batch=8, wait_s=30.0)
        batcher.start()
        try:
            provider = TracerProvider()
            tracer = provider.get_tracer("t")
            with tracer.start_as_current_span("request") as span:
                timeline = RequestTimeline(metrics, Modality.IMAGE, span.get_span_context())
                ctx = span.get_span_context()
                expected = batcher.expect(3)
                first = asyncio.ensure_future(
                    batcher.embed(image(1), timeline.enter(0, Stage.EMBED, "a"), ctx, expected)
                )
                await asyncio.sleep(0.2)
                assert model.batches == []
                second = asyncio.ensure_future(
                    batcher.embed(image(2), timeline.enter(1, Stage.EMBED, "b"), ctx, expected)
                )
                await asyncio.sleep(0.2)
                assert model.batches == [], "the third image is still on its way"
                batcher.withdraw(expected)
                await asyncio.gather(first, second)
        finally:
            await batcher.close()

    asyncio.run(scenario())
    assert model.batches == [2]


def test_the_last_image_of_a_request_is_not_held_for_other_requests_images() -> None:
    """Request A's last image goes at once, with what is queued, though B's images are still on
    their way and the batch wait is long: A is answered when its last image is."""
    model = RecordingModel()

    async def scenario() -> float:
        async with running(model, max_batch=8, wait_s=30.0) as (batcher, send):
            a, b = batcher.expect(2), batcher.expect(5)
            first, other = send(1, a), send(2, b)
            await asyncio.sleep(0.2)
            assert model.batches == [], "A and B both have images on their way: the batch waits"
            started = time.perf_counter()
            await send(3, a)
            waited = time.perf_counter() - started
            for _ in range(4):
                batcher.withdraw(b)
            await asyncio.gather(first, other)
            return waited

    assert asyncio.run(scenario()) < 10.0
    assert model.batches == [3]


def test_a_model_slower_than_the_wait_does_not_wait_for_fuller_batches() -> None:
    """Its last forward pass took longer than the wait: new images queue while it works, so a wait
    would only leave it idle. B's first image goes alone at once, though two more are coming (had it
    waited, the second, sent 0.2 s later, would have joined it)."""
    model = RecordingModel(delay_s=0.6)

    async def scenario() -> None:
        async with running(model, max_batch=8, wait_s=0.5) as (batcher, send):
            a = batcher.expect(1)
            await send(1, a)
            b = batcher.expect(3)
            first = send(2, b)
            await asyncio.sleep(0.2)
            second = send(3, b)
            await asyncio.sleep(0.1)
            batcher.withdraw(b)
            await asyncio.gather(first, second)

    asyncio.run(scenario())
    assert model.batches == [1, 1, 1]


def test_batch_spans_link_to_the_requests_they_served() -> None:
    model = RecordingModel()

    async def scenario() -> tuple[InMemorySpanExporter, list[tuple[int, int]]]:
        batcher, exporter, metrics = make(model, max_batch=8, wait_s=0.0)
        batcher.start()
        provider = TracerProvider()
        tracer = provider.get_tracer("t")
        contexts = []
        try:
            with tracer.start_as_current_span("request") as span:
                contexts.append((span.get_span_context().trace_id, span.get_span_context().span_id))
                timeline = RequestTimeline(metrics, Modality.IMAGE, span.get_span_context())
                expected = batcher.expect(1)
                await batcher.embed(
                    image(3), timeline.enter(0, Stage.EMBED, "x"), span.get_span_context(), expected
                )
        finally:
            await batcher.close()
        return exporter, contexts

    exporter, contexts = asyncio.run(scenario())
    batches = [s for s in exporter.get_finished_spans() if s.name == "embed batch"]
    assert len(batches) == 1
    assert [(link.context.trace_id, link.context.span_id) for link in batches[0].links] == contexts
    assert batches[0].attributes is not None
    assert batches[0].attributes["cliplens.batch.size"] == 1
    assert batches[0].attributes["cliplens.model.runtime"] == "recording", "the span says what ran it"
    assert batches[0].attributes["cliplens.model.int8_cosine_min"] == 0.5
    assert batches[0].parent is None


@pytest.mark.parametrize("max_batch", [1, 3])
def test_vectors_return_to_their_own_images(max_batch: int) -> None:
    model = RecordingModel()

    async def scenario() -> list[float]:
        batcher, _, metrics = make(model, max_batch=max_batch, wait_s=0.001)
        batcher.start()
        try:
            return await _request(batcher, metrics, [50, 100, 150, 200, 250], TracerProvider())
        finally:
            await batcher.close()

    preprocessor = Preprocessor(PreprocessConfig(size=(4, 4)), torch.device("cpu"))
    expected = [
        float(preprocessor.normalize([image(v)], torch.float32).mean()) for v in (50, 100, 150, 200, 250)
    ]
    assert asyncio.run(scenario()) == pytest.approx(expected, abs=1e-5)
