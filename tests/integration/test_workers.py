"""The bounded CPU executor: decode and preprocess run on at most `cpu_workers` threads, never more
at once than that, shared by every request; the model runs on one thread of its own."""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor

from litestar.testing import TestClient
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cliplens.app import create_app
from cliplens.settings import Settings
from cliplens.vocabulary import Stage
from tests.conftest import wait_ready

CPU_WORKERS = 3
"""Not the fixture's 2: the pool is sized by the setting given here."""
CPU_STAGES = (Stage.DECODE, Stage.PREPROCESS)
"""The stages whose work runs on the CPU pool."""
"""The stages whose work runs on the CPU executor (loading is I/O on the event loop)."""


def test_concurrent_requests_share_one_bounded_cpu_pool(settings: Settings) -> None:
    # without the embedding cache, every one of the 48 images is decoded and preprocessed
    bounded = dataclasses.replace(settings, cpu_workers=CPU_WORKERS, max_inputs=64, cache_bytes=0)
    before = set(threading.enumerate())
    app = create_app(bounded)
    exporter = InMemorySpanExporter()
    app.state.runtime.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    names = ["album/1/a.jpg", "album/1/b.jpg", "album/2/c.jpg"] * 4
    with TestClient(app, timeout=120) as client:
        wait_ready(client)
        with ThreadPoolExecutor(max_workers=4) as pool:
            responses = list(
                pool.map(lambda _: client.post("/v1/embeddings", json={"input": names}), range(4))
            )
        started = [t for t in threading.enumerate() if t not in before]
    assert all(len(r.json()["data"]) == len(names) for r in responses)
    cpu_threads = {t.name for t in started if t.name.startswith("cliplens-cpu")}
    assert 0 < len(cpu_threads) <= CPU_WORKERS, sorted(cpu_threads)
    model_threads = [t.name for t in started if t.name.startswith("cliplens-model")]
    assert len(model_threads) == 1, model_threads

    intervals = []
    for span in exporter.get_finished_spans():
        if span.name in CPU_STAGES:
            for event in span.events:
                assert event.attributes is not None
                work_ms = event.attributes["cliplens.image.work_ms"]
                assert isinstance(work_ms, float)
                end = event.timestamp
                intervals.append((end - int(work_ms * 1e6), end))
    assert len(intervals) == len(CPU_STAGES) * 4 * len(names)
    # Each request anchors its own wall clock (microseconds apart): shave 0.1 ms off each end
    # so that one task ending and the next starting on the same thread never look like overlap.
    margin = 100_000
    edges = sorted(
        [(s + margin, 1) for s, e in intervals if e - s > 2 * margin]
        + [(e - margin, -1) for s, e in intervals if e - s > 2 * margin]
    )
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    # Never more at once than the pool's size, and more than one at once: four requests of twelve
    # images keep every worker busy, so a pool that ran one task at a time would fail here too.
    assert 1 < peak <= CPU_WORKERS, peak
