"""The process-wide bounded executor: never more decode/preprocess work at once than its size."""

from __future__ import annotations

import dataclasses

from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cliplens.app import create_app
from cliplens.settings import Settings
from tests.conftest import wait_ready


def test_concurrent_requests_share_one_bounded_cpu_pool(settings: Settings) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from litestar.testing import TestClient

    bounded = dataclasses.replace(settings, cpu_workers=2, max_inputs=64)
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
        service = app.state.runtime.service
        assert service.executor._max_workers == 2
        assert len(service.executor._threads) <= 2
    assert all(len(r.json()["data"]) == len(names) for r in responses)
    intervals = []
    for span in exporter.get_finished_spans():
        if span.name in ("decode", "preprocess"):
            for event in span.events:
                end = event.timestamp
                start = end - int(event.attributes["cliplens.image.work_ms"] * 1e6)
                intervals.append((start, end))
    assert len(intervals) == 2 * 4 * len(names)
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
    assert peak <= 2
