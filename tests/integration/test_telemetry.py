"""One measurement, three sinks: spans through a real OTLP receiver, /metrics parsed, Server-Timing."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from cliplens.settings import Settings
from cliplens.vocabulary import PIPELINE_STAGES, Stage
from tests.conftest import running
from tests.harness.servers import GrpcOtlpReceiver, HttpOtlpReceiver, ReceivedSpan


@pytest.fixture(params=["grpc", "http/protobuf"])
def receiver(request: pytest.FixtureRequest) -> Iterator[GrpcOtlpReceiver | HttpOtlpReceiver]:
    server = GrpcOtlpReceiver() if request.param == "grpc" else HttpOtlpReceiver()
    server.start()
    yield server
    server.stop()


def server_timing(header: str) -> dict[str, float]:
    return {name: float(value) for name, value in re.findall(r"(\w+);dur=([0-9.]+)", header)}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def test_stage_spans_reach_the_receiver_under_the_request_span(
    settings: Settings, receiver: GrpcOtlpReceiver | HttpOtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    protocol: Literal["grpc", "http/protobuf"] = (
        "grpc" if isinstance(receiver, GrpcOtlpReceiver) else "http/protobuf"
    )
    traced = dataclasses.replace(settings, otlp_endpoint=receiver.endpoint, otlp_protocol=protocol)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "cliplens-test")  # read by the OpenTelemetry SDK itself
    inputs = ["album/1/a.jpg", "album/nope.jpg", "album/2/c.jpg"]
    with running(traced) as client:
        response = client.post("/v1/embeddings", json={"input": inputs})
        client.get("/metrics")
        client.get("/healthz")
    trace_id = response.headers["x-trace-id"]
    spans = receiver.store.wait_for(
        lambda got: any(s.name == "embed" and s.trace_id == trace_id for s in got)
    )
    in_trace = [s for s in spans if s.trace_id == trace_id]
    roots = [s for s in in_trace if s.parent_span_id == ""]
    assert [s.name for s in roots] == ["POST /v1/embeddings"]
    root = roots[0]
    assert root.service_name == "cliplens-test"
    by_name: dict[str, ReceivedSpan] = {s.name: s for s in in_trace}
    assert sorted(by_name) == sorted([root.name, *Stage, "read file"])
    for stage in Stage:
        assert by_name[stage].parent_span_id == root.span_id
    reads = [s for s in in_trace if s.name == "read file"]  # one per file loaded, under `load`
    assert len(reads) == 2 and {s.parent_span_id for s in reads} == {by_name["load"].span_id}

    # the embedding cache looks every file up first: the missing one fails there, before any load
    lookups = {e[2]["cliplens.image.ref"]: e[2] for e in by_name["cache"].events if e[0] == "image"}
    assert set(lookups) == set(inputs)
    assert lookups["album/nope.jpg"]["cliplens.image.error"] == "not_found"
    assert lookups["album/1/a.jpg"]["cliplens.image.misses"] == 1
    assert by_name["cache"].status_code == 2
    cache_span = by_name["cache"].attributes
    assert (cache_span["cliplens.cache.hits"], cache_span["cliplens.cache.misses"]) == (0, 2)
    load_events = {e[2]["cliplens.image.ref"]: e[2] for e in by_name["load"].events if e[0] == "image"}
    assert set(load_events) == {"album/1/a.jpg", "album/2/c.jpg"}
    loaded_bytes = load_events["album/1/a.jpg"]["cliplens.image.bytes"]
    assert isinstance(loaded_bytes, int) and loaded_bytes > 0
    assert by_name["load"].attributes["cliplens.images"] == 2
    loaded = sum(int(event["cliplens.image.bytes"]) for event in load_events.values())  # type: ignore[call-overload]
    assert by_name["load"].attributes["cliplens.bytes"] == loaded
    decode_refs = {e[2]["cliplens.image.ref"] for e in by_name["decode"].events}
    assert decode_refs == {"album/1/a.jpg", "album/2/c.jpg"}

    timing = server_timing(response.headers["server-timing"])
    for stage in Stage:
        assert timing[stage] == pytest.approx(by_name[stage].duration_ms, abs=0.051)

    batches = [s for s in spans if s.name == "embed batch"]
    linked = {(t, s) for t, s in by_name["embed"].links}
    assert linked and linked <= {(b.trace_id, b.span_id) for b in batches}
    for batch in batches:
        if (batch.trace_id, batch.span_id) in linked:
            assert (root.trace_id, root.span_id) in batch.links

    assert not any(s.name.startswith(("GET /metrics", "GET /healthz", "GET /readyz")) for s in spans)
    assert not any("http send" in s.name or "http receive" in s.name for s in spans)


def test_metrics_count_exactly_what_was_sent(settings: Settings) -> None:
    with running(settings) as client:
        first = client.post(
            "/v1/embeddings", json={"input": ["album/1/a.jpg", "album/1/b.jpg", "album/nope.jpg"]}
        )
        second = client.post("/v1/embeddings", json={"input": ["album/2/c.jpg", "gs://elsewhere/x.jpg"]})
        client.post("/v1/embeddings", json={"input": ["hello"], "modality": "text"})
        text = client.get("/metrics").text
    found = samples(text)
    assert value(found, "cliplens_images_total", outcome="ok") == 3
    assert value(found, "cliplens_images_total", outcome="not_found") == 1
    assert value(found, "cliplens_images_total", outcome="forbidden") == 1
    assert value(found, "cliplens_images_total", outcome="decode_failed") == 0
    assert value(found, "cliplens_texts_total") == 1
    # the missing file fails in the cache's lookup (its status), the other bucket before any stage
    assert value(found, "cliplens_image_stage_seconds_count", stage="cache") == 4
    assert value(found, "cliplens_image_stage_seconds_count", stage="load") == 4
    assert value(found, "cliplens_image_stage_seconds_count", stage="decode") == 3
    assert value(found, "cliplens_image_stage_seconds_count", stage="preprocess") == 3
    assert value(found, "cliplens_stage_queue_seconds_count", stage="embed") == 3
    for stage in Stage:
        assert value(found, "cliplens_request_stage_seconds_count", stage=stage) == 2
    assert value(found, "cliplens_request_seconds_count", modality="image") == 2
    assert value(found, "cliplens_request_seconds_count", modality="text") == 1
    assert value(found, "cliplens_request_images_count") == 2
    assert value(found, "cliplens_request_images_sum") == 5
    assert value(found, "cliplens_requests_in_flight") == 0
    assert value(found, "cliplens_requests_in_flight_max") == 1
    assert value(found, "cliplens_images_in_flight_max") == 3
    assert value(found, "cliplens_images_in_flight_limit") == settings.max_images_in_flight
    assert value(found, "cliplens_embed_batch_size_sum", modality="image") == 3
    load_sum = value(found, "cliplens_request_stage_seconds_sum", stage="load") * 1000
    headers = [server_timing(r.headers["server-timing"])["load"] for r in (first, second)]
    assert load_sum == pytest.approx(sum(headers), abs=0.11)
    assert sum(v for (name, _), v in found.items() if name == "cliplens_model_info") == 1


def test_metrics_carry_the_process_and_the_interpreter(settings: Settings) -> None:
    """Memory, CPU, open files and the garbage collector, for alerts on the process itself."""
    with running(settings) as client:
        found = samples(client.get("/metrics").text)
    names = {name for name, _ in found}
    assert {"python_info", "python_gc_collections_total"} <= names
    if Path("/proc/self/stat").exists():  # prometheus_client reads the process from Linux's /proc
        assert value(found, "process_resident_memory_bytes") > 10_000_000
        assert value(found, "process_cpu_seconds_total") > 0
        assert value(found, "process_open_fds") > 0


def test_openmetrics_scrape_carries_trace_id_exemplars(settings: Settings) -> None:
    with running(settings) as client:
        response = client.post("/v1/embeddings", json={"input": ["album/1/a.jpg"]})
        scrape = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        plain = client.get("/metrics")
    assert scrape.headers["content-type"].startswith("application/openmetrics-text")
    assert plain.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert scrape.headers["content-type"].count("charset") == 1
    exemplars = {
        sample.exemplar.labels["trace_id"]
        for family in parse_openmetrics(scrape.text)
        if family.name == "cliplens_request_seconds"
        for sample in family.samples
        if sample.exemplar is not None
    }
    assert exemplars == {response.headers["x-trace-id"]}


def test_an_unsampled_request_records_metrics_without_exemplars(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")  # read by the OpenTelemetry SDK itself
    with running(settings) as client:
        response = client.post("/v1/embeddings", json={"input": ["album/1/a.jpg"]})
        scrape = client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        ).text
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-trace-id"])
    assert 'cliplens_request_seconds_count{modality="image"} 1.0' in scrape
    assert "trace_id" not in scrape


def test_exact_extremes_and_per_image_timings_agree_with_server_timing(settings: Settings) -> None:
    inputs = [["album/1/a.jpg"], ["album/1/a.jpg", "album/1/b.jpg", "album/2/c.jpg"], ["album/2/c.jpg"]]
    with running(settings) as client:
        # repeated photos, embedded again: the requests skip the cache
        body = {"timings": True, "cache": False}
        responses = [client.post("/v1/embeddings", json={"input": i, **body}) for i in inputs]
        found = samples(client.get("/metrics").text)
    load = [server_timing(r.headers["server-timing"])["load"] for r in responses]
    low = value(found, "cliplens_request_stage_min_seconds", stage="load") * 1000
    high = value(found, "cliplens_request_stage_max_seconds", stage="load") * 1000
    assert low == pytest.approx(min(load), abs=0.051)
    assert high == pytest.approx(max(load), abs=0.051)
    decode_work = [item["stages"]["decode"]["work_ms"] for r in responses for item in r.json()["timings"]]
    assert len(decode_work) == 5
    assert value(found, "cliplens_image_stage_max_seconds", stage="decode") * 1000 == pytest.approx(
        max(decode_work), abs=0.001
    )
    assert value(found, "cliplens_image_stage_min_seconds", stage="decode") * 1000 == pytest.approx(
        min(decode_work), abs=0.001
    )
    first = responses[1].json()["timings"]
    assert [t["index"] for t in first] == [0, 1, 2]
    assert set(first[0]["stages"]) == set(PIPELINE_STAGES)
    assert "timings" not in client_free_body(settings)


def client_free_body(settings: Settings) -> dict[str, object]:
    with running(settings) as client:
        body: dict[str, object] = client.post("/v1/embeddings", json={"input": ["album/1/a.jpg"]}).json()
    return body
