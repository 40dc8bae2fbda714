"""Three replicas behind one address, scraped by a real Prometheus: the telemetry adds up.

One run (module fixture), on loopback:

- three `cliplens serve` processes (tests/harness/replicas.py) with the settings of the `cpu` overlay's
  rendered ConfigMap and the Deployment's OTEL_RESOURCE_ATTRIBUTES (its `$(POD_NAME)` expanded as
  the kubelet does), model and photos swapped for the tiny test ones;
- HAProxy running the compose stack's deploy/compose/haproxy.cfg, round-robin over the three;
- a real Prometheus running deploy/kubernetes/prometheus/prometheus.yml, the configuration for a
  cluster without the operator, its `kubernetes_sd_configs` swapped for a file that lists what
  Kubernetes' pod discovery would: the three pods (labels and annotations from the rendered
  Deployment, the port annotation set to each replica's port), plus a collector pod and a Pending
  pod that the relabelling must drop;
- an OTLP receiver that all three export their spans to;
- the load of tests/integration/test_prometheus.py (tests/harness/stage_load.py: closed-loop
  concurrency 1, 2, 4, 8), sent through the proxy, with every `Server-Timing` header and
  per-image `timings` body kept.

Then: Prometheus sees exactly the three pods, by name; every dashboard query returns data for all
of them, for each one, and for each stage; cluster-wide min / max / mean per stage equal what the
client measured, at every level; exemplars and traces lead to the right replica; the autoscaling
query of the KEDA ScaledObject, evaluated verbatim, rises under the load and falls back to zero
after it; and a replica that gets SIGTERM mid-load drains without failing a request.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cliplens.vocabulary import IMAGE_WORK_STAGES, Stage
from tests.harness.dashboards import (
    BODY_TOLERANCE_S,
    DASHBOARDS,
    HEADER_TOLERANCE_S,
    assert_every_panel_has_data,
    assert_exemplars_match_the_load,
    assert_in_flight_within_levels_and_errors_counted,
    assert_per_image_work_and_wait_match,
    assert_request_stages_match,
    assert_rules_load_and_evaluate,
    bucket_bounds,
    evaluate,
    has_data,
    has_data_here,
    range_table,
    span,
    targets,
)
from tests.harness.manifests import KUBERNETES, Manifest, container, find, render, settings
from tests.harness.prometheus import SCRAPE_S, PrometheusServer
from tests.harness.replicas import Haproxy, ServeProcess
from tests.harness.servers import HttpOtlpReceiver
from tests.harness.stage_load import EXTREMES_WINDOW_S, PHOTOS, Run, drive, new_photo

pytestmark = pytest.mark.slow  # about 80 s: three replicas, four load levels, the autoscaling window

NAMESPACE = "cliplens"
PODS = ("cliplens-6d5f9c7b8d-4xkzq", "cliplens-6d5f9c7b8d-9wmtr", "cliplens-6d5f9c7b8d-ztq2p")
"""Pod names as a ReplicaSet makes them: what the dashboard's `instance` variable lists."""
KUBERNETES_PROMETHEUS = KUBERNETES / "prometheus" / "prometheus.yml"


def meta_labels(manifest_pod: Manifest, namespace: str, name: str, phase: str, port: str) -> dict[str, str]:
    """The `__meta_kubernetes_*` labels Prometheus's pod discovery gives one container port."""

    def sanitized(key: str) -> str:
        return re.sub(r"[^a-zA-Z0-9_]", "_", key)

    metadata = manifest_pod["metadata"]
    labels = {
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_pod_name": name,
        "__meta_kubernetes_pod_phase": phase,
        "__meta_kubernetes_pod_ready": "true" if phase == "Running" else "false",
        "__meta_kubernetes_pod_container_port_name": "http",
        "__meta_kubernetes_pod_container_port_number": port,
    }
    for key, value in metadata.get("labels", {}).items():
        labels[f"__meta_kubernetes_pod_label_{sanitized(key)}"] = value
        labels[f"__meta_kubernetes_pod_labelpresent_{sanitized(key)}"] = "true"
    for key, value in metadata.get("annotations", {}).items():
        labels[f"__meta_kubernetes_pod_annotation_{sanitized(key)}"] = value
        labels[f"__meta_kubernetes_pod_annotationpresent_{sanitized(key)}"] = "true"
    return labels


class KubernetesPrometheus(PrometheusServer):
    """The harness's real Prometheus (as in test_prometheus.py), running
    deploy/kubernetes/prometheus/prometheus.yml.

    Kubernetes discovery is replaced by a file of the same targets and meta labels (Debian's
    Prometheus is built without Kubernetes discovery, and there is no cluster here); everything
    else, the relabelling included, is the file as shipped.
    """

    def __init__(self, workdir: Path, targets: list[dict[str, Any]]) -> None:
        super().__init__(
            workdir, target="unused:0"
        )  # copies observability/ (the rules) and the binary set-up
        config = yaml.safe_load(KUBERNETES_PROMETHEUS.read_text())
        interval = f"{SCRAPE_S}s"
        config["global"].update(
            scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval
        )
        (job,) = config["scrape_configs"]
        (discovery,) = job.pop("kubernetes_sd_configs")
        assert discovery["role"] == "pod"
        targets_path = workdir / "pods.json"
        targets_path.write_text(json.dumps(targets))
        job["file_sd_configs"] = [{"files": [str(targets_path)], "refresh_interval": interval}]
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


@dataclass
class Replicated:
    run: Run
    """What the harness's checks read; `target` is the first pod."""
    proxy: Haproxy
    replicas: list[ServeProcess]
    receiver: HttpOtlpReceiver
    manifests: list[Manifest]
    load_ended: float
    idle_before: float
    instances: dict[str, set[str]]
    """trace id -> the `service.instance.id` of the replicas whose spans carry it."""
    quiet_since: float = 0.0
    """When the last request through the proxy ended (tests that send some move it)."""


def replica_environment(
    manifests: list[Manifest], tiny_model: str, photo_dir: Path, otlp: str
) -> dict[str, str]:
    """The `cpu` overlay's settings, with the tiny model, local photos and the test's receiver."""
    environment = settings(manifests, find(manifests, "Deployment", "cliplens"))
    environment.update(
        CLIPLENS_MODEL=tiny_model,
        CLIPLENS_PRETRAINED="none",
        CLIPLENS_DEFAULT_BUCKET="",
        CLIPLENS_IMAGE_ROOT=str(photo_dir),
        CLIPLENS_CPU_WORKERS="1",
        CLIPLENS_MODEL_THREADS="1",
        CLIPLENS_EXTREMES_WINDOW_S=str(EXTREMES_WINDOW_S),
        CLIPLENS_LOG_LEVEL="WARNING",
        CLIPLENS_ON_ERROR="partial",  # as tests/conftest.py's PARTIAL says
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp,
        # The overlay samples 10 %: here every request, so every one can be checked.
        OTEL_TRACES_SAMPLER="parentbased_always_on",
    )
    environment.pop("OTEL_TRACES_SAMPLER_ARG", None)
    return environment


def pod_environment(deployment: Manifest, pod: str) -> dict[str, str]:
    """The Deployment's literal `env`, with the downward API's values and `$(VAR)` expanded."""
    fields = {"metadata.name": pod, "metadata.namespace": NAMESPACE, "spec.nodeName": "node-a"}
    values: dict[str, str] = {}
    for variable in container(deployment)["env"]:
        if "valueFrom" in variable:
            values[variable["name"]] = fields[variable["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            values[variable["name"]] = re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], variable["value"])
    return values


def discovered_pods(manifests: list[Manifest], replicas: list[ServeProcess]) -> list[dict[str, Any]]:
    """What pod discovery lists: the three replicas, the collector, and a cliplens pod still Pending."""
    template = find(manifests, "Deployment", "cliplens")["spec"]["template"]
    groups = []
    for pod, replica in zip(PODS, replicas, strict=True):
        annotated = json.loads(json.dumps(template))
        annotated["metadata"]["annotations"]["prometheus.io/port"] = str(replica.port)
        groups.append(
            {
                "targets": [replica.address],
                "labels": meta_labels(annotated, NAMESPACE, pod, "Running", str(replica.port)),
            }
        )
    collector = find(manifests, "Deployment", "otel-collector")["spec"]["template"]
    groups.append(
        {
            "targets": ["127.0.0.1:4318"],
            "labels": meta_labels(collector, NAMESPACE, "otel-collector-7c9d8-abcde", "Running", "4318"),
        }
    )
    pending = json.loads(json.dumps(template))
    pending["metadata"]["annotations"]["prometheus.io/port"] = "9"
    groups.append(
        {
            "targets": ["127.0.0.1:9"],
            "labels": meta_labels(pending, NAMESPACE, "cliplens-6d5f9c7b8d-pendg", "Pending", "9"),
        }
    )
    return groups


def record_instances(receiver: HttpOtlpReceiver) -> dict[str, set[str]]:
    """Which replica sent each trace: the receiver's store keeps spans, this keeps their resource."""
    instances: dict[str, set[str]] = {}
    lock = threading.Lock()
    keep = receiver.store.add

    def add(request: Any) -> None:
        keep(request)
        with lock:
            for resource_spans in request.resource_spans:
                resource = {kv.key: kv.value.string_value for kv in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        instances.setdefault(span.trace_id.hex(), set()).add(
                            resource.get("service.instance.id", "")
                        )

    receiver.store.add = add  # type: ignore[method-assign]
    return instances


def keda_query(manifests: list[Manifest]) -> str:
    (trigger,) = find(manifests, "ScaledObject")["spec"]["triggers"]
    return str(trigger["metadata"]["query"])


@pytest.fixture(scope="module")
def replicated(
    tiny_model: str, photo_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replicated]:
    workdir = tmp_path_factory.mktemp("replicas")
    manifests = render("cpu")
    deployment = find(manifests, "Deployment", "cliplens")
    receiver = HttpOtlpReceiver()
    instances = record_instances(receiver)
    receiver.start()
    environment = replica_environment(manifests, tiny_model, photo_dir, receiver.endpoint)
    replicas = [
        ServeProcess(pod, {**environment, **pod_environment(deployment, pod)}, workdir / f"{pod}.log")
        for pod in PODS
    ]
    proxy: Haproxy | None = None
    prometheus: KubernetesPrometheus | None = None
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready()
        proxy = Haproxy([replica.address for replica in replicas], workdir).start()
        prometheus = KubernetesPrometheus(
            workdir / "prometheus", discovered_pods(manifests, replicas)
        ).start()
        deadline = time.monotonic() + 20
        while len(prometheus.instant('up{job="cliplens"} == 1', time.time())) < len(PODS):
            assert time.monotonic() < deadline, f"not all pods scraped: {prometheus.log_path.read_text()}"
            time.sleep(0.2)
        time.sleep(3 * SCRAPE_S)  # a few idle scrapes: the signal's value before any load
        idle_before = time.time()
        start = time.time()
        levels = asyncio.run(drive(proxy.url, prometheus))
        load_ended = max(level.ended for level in levels)
        last_scrape = prometheus.value('max(timestamp(up{job="cliplens"}))', time.time())
        run = Run(prometheus, PODS[0], levels, start, last_scrape)
        yield Replicated(
            run, proxy, replicas, receiver, manifests, load_ended, idle_before, instances, load_ended
        )
    finally:
        if prometheus is not None:
            prometheus.stop()
        if proxy is not None:
            proxy.stop()
        for replica in replicas:
            replica.stop()
        receiver.stop()


# ---- traces join up through the proxy (first: the requests it sends come after the load's end) ---


def test_a_callers_trace_continues_on_whichever_replica_the_proxy_picks(replicated: Replicated) -> None:
    sent: dict[str, str] = {}
    with httpx.Client(base_url=replicated.proxy.url, timeout=60) as client:
        for _ in PODS:
            trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
            response = client.post(
                "/v1/embeddings",
                json={"input": [*PHOTOS, new_photo()]},  # cache hits, and a new photo: every stage
                headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
            )
            assert response.status_code == 200
            assert response.headers["x-trace-id"] == trace_id
            sent[trace_id] = parent_id
    replicated.quiet_since = time.time()
    store = replicated.receiver.store
    # The server span ends last: once it is in, every span of its request was exported before it.
    spans = store.wait_for(lambda spans: {(s.trace_id, s.parent_span_id) for s in spans} >= set(sent.items()))
    replicas_seen = set()
    for trace_id, parent_id in sent.items():
        trace = [s for s in spans if s.trace_id == trace_id and s.name != "embed batch"]
        (server,) = [s for s in trace if s.parent_span_id == parent_id]
        assert {s.name for s in trace} >= set(Stage)
        ids = {s.span_id for s in trace}
        assert all(s.parent_span_id in ids for s in trace if s is not server), (
            "one tree under the caller's span"
        )
        instances = {s.service_name for s in trace}
        assert instances == {"cliplens"}
        replicas_seen.add(server_instance(replicated, trace_id))
    assert replicas_seen == set(PODS), "round-robin: each of three requests on another replica"


def server_instance(replicated: Replicated, trace_id: str) -> str:
    """The `service.instance.id` of the replica that served a trace (its resource, from OTLP)."""
    instances = replicated.instances.get(trace_id, set())
    assert len(instances) == 1, instances
    return next(iter(instances))


# ---- Prometheus finds the replicas ------------------------------------------------------------


def test_prometheus_scrapes_exactly_the_three_pods_named_as_kubernetes_names_them(
    replicated: Replicated,
) -> None:
    prometheus = replicated.run.prometheus
    active = prometheus.api("targets", state="active")["activeTargets"]
    cliplens = [t for t in active if t["labels"]["job"] == "cliplens"]
    assert sorted(t["labels"]["instance"] for t in cliplens) == sorted(PODS)
    for target in cliplens:
        labels = target["labels"]
        assert labels["pod"] == labels["instance"] and labels["namespace"] == NAMESPACE
        assert target["health"] == "up", target
    dropped = prometheus.api("targets", state="dropped")["droppedTargets"]
    names = {t["discoveredLabels"]["__meta_kubernetes_pod_name"] for t in dropped}
    assert names == {"otel-collector-7c9d8-abcde", "cliplens-6d5f9c7b8d-pendg"}


def test_round_robin_gave_every_replica_its_share(replicated: Replicated) -> None:
    run = replicated.run
    served = run.prometheus.by_label(
        "sum by (instance) (cliplens_request_seconds_count)", run.end, "instance"
    )
    assert set(served) == set(PODS)
    assert sum(served.values()) == len(run.sent)
    for pod, count in served.items():
        assert count >= len(run.sent) / len(PODS) * 0.6, (pod, served)


# ---- the dashboard across replicas ------------------------------------------------------------


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_every_panel_query_returns_data_for_all_replicas(replicated: Replicated, path: Path) -> None:
    assert_every_panel_has_data(replicated.run, path)


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_every_panel_query_returns_data_for_each_replica_and_each_stage(
    replicated: Replicated, path: Path
) -> None:
    """Drilled into one replica and one stage: every replica and every stage come up at least once."""
    dashboard = json.loads(path.read_text())
    empty = []
    for i, stage in enumerate(Stage):
        pod = PODS[i % len(PODS)]
        instance = re.escape(pod).replace("\\", "\\\\")  # as Grafana escapes a value for PromQL
        variables = {"instance": instance, "stage": stage, "work_stage": stage, "gpu": ".*"}
        for title, target in targets(dashboard):
            if stage not in IMAGE_WORK_STAGES and "$work_stage" in target["expr"]:
                continue  # `embed` has no per-image work: the work panels are not drawn for it
            if not has_data_here(target):
                continue
            if not has_data(evaluate(replicated.run, target, variables)):
                empty.append(f"[{pod}, {stage}] {title}: {target['expr']}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


def test_the_instance_variable_lists_the_pods(replicated: Replicated) -> None:
    dashboard = json.loads(DASHBOARDS[0].read_text())
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "instance"]
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"])
    assert match
    run = replicated.run
    found = run.prometheus.api(
        f"label/{match.group(2)}/values",
        **{"match[]": match.group(1), "start": f"{run.start:.3f}", "end": f"{run.end:.3f}"},
    )
    assert sorted(found) == sorted(PODS)


# ---- cluster-wide numbers equal the client's --------------------------------------------------


def test_cluster_wide_request_stage_min_max_mean_match_server_timing_at_every_level(
    replicated: Replicated,
) -> None:
    run = replicated.run
    prometheus = run.prometheus
    whole_run = f"{int((run.end - run.start) * 1000)}ms"
    failed = prometheus.value(f'min(min_over_time(up{{job="cliplens"}}[{whole_run}]))', run.end)
    assert failed == 1, "a scrape failed during the load: an extreme may be missed"
    for level in run.levels:
        assert_request_stages_match(prometheus, level)


def test_cluster_wide_per_image_work_and_wait_match_the_response_timings_at_every_level(
    replicated: Replicated,
) -> None:
    assert_per_image_work_and_wait_match(replicated.run)


def test_the_dashboard_range_tables_agree_with_the_client_over_the_whole_run(replicated: Replicated) -> None:
    """min and max are exact; counts and means come from increase(), which extrapolates each series
    to the range's end: one end cannot be the last scrape of three unaligned targets, so they agree
    to within that extrapolation (at most 1.1 scrape intervals over the run's length)."""
    run = replicated.run
    dashboard = json.loads(DASHBOARDS[0].read_text())
    images = [s for s in run.sent if s.modality == "image"]
    per_image = [image for s in run.sent for image in s.images]
    drift = 1.1 * SCRAPE_S / (run.end - run.prometheus.started_at - 1.1 * SCRAPE_S)
    for title, label, seen, tolerance in (
        (
            "Per request, over the selected range",
            "stage",
            {st: [s.stages_s[st] for s in images if st in s.stages_s] for st in Stage},
            HEADER_TOLERANCE_S,
        ),
        (
            "Per image queue wait, over the selected range",
            "stage",
            {st: [i[st]["queue_ms"] for i in per_image if st in i] for st in Stage},
            BODY_TOLERANCE_S,
        ),
        (
            "Per image work, over the selected range",
            "stage",
            {st: [i[st]["work_ms"] for i in per_image if st in i] for st in IMAGE_WORK_STAGES},
            BODY_TOLERANCE_S,
        ),
        (
            "Whole request, over the selected range",
            "modality",
            {m: [s.stages_s["total"] for s in run.sent if s.modality == m] for m in ("image", "text")},
            HEADER_TOLERANCE_S,
        ),
    ):
        table = range_table(run, dashboard, title, label)
        for key, values in seen.items():
            what = f"{title}: {key}"
            assert table["min"][key] == pytest.approx(min(values), abs=tolerance), what
            assert table["max"][key] == pytest.approx(max(values), abs=tolerance), what
            assert len(values) <= table["observations"][key] <= len(values) * (1 + drift), what
            mean = sum(values) / len(values)
            assert table["mean"][key] == pytest.approx(mean, rel=drift, abs=tolerance), what
            for column, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
                low, high = quantile_bounds(values, q, tolerance, drift)
                assert low <= table[column][key] <= high, (what, column)


def quantile_bounds(values: list[float], q: float, tolerance: float, drift: float) -> tuple[float, float]:
    """Where histogram_quantile may land when every bucket count may be inflated by up to `drift`.

    The quantile's rank q x n then moves to anywhere in [q x n / (1 + drift), q x n x (1 + drift)]:
    the answer lies between the buckets of the observations at those ranks.
    """
    ranked = sorted(values)
    lowest = max(math.ceil(q * len(values) / (1 + drift)) - 1, 0)
    highest = min(math.ceil(q * len(values) * (1 + drift)), len(values)) - 1
    return bucket_bounds(ranked[lowest] - tolerance)[0], bucket_bounds(ranked[highest] + tolerance)[1]


def test_in_flight_stays_within_each_level_and_errors_are_counted_by_code(replicated: Replicated) -> None:
    assert_in_flight_within_levels_and_errors_counted(replicated.run)


def test_the_exact_in_flight_peaks_see_what_the_sampled_gauges_miss(replicated: Replicated) -> None:
    """One client, one request at a time: every replica's exact peak is one request and the images
    of the largest request, however short the requests were between two scrapes."""
    run = replicated.run
    prometheus = run.prometheus
    for level in run.levels:
        window = span(level)
        busiest = prometheus.value(
            f"max(max_over_time(cliplens_requests_in_flight_max[{window}]))", level.ended
        )
        images = prometheus.value(f"max(max_over_time(cliplens_images_in_flight_max[{window}]))", level.ended)
        largest = max(len(s.images) for s in level.sent)
        if level.concurrency == 1:
            assert busiest == 1
            assert images == largest
        assert 1 <= busiest <= level.concurrency
        assert largest <= images <= largest * level.concurrency


def test_exemplars_carry_the_trace_ids_and_values_of_the_load(replicated: Replicated) -> None:
    assert_exemplars_match_the_load(replicated.run)


def test_recording_and_alerting_rules_load_and_evaluate(replicated: Replicated) -> None:
    assert_rules_load_and_evaluate(replicated.run)


# ---- autoscaling ------------------------------------------------------------------------------


def test_the_keda_query_rises_under_load_and_falls_back_to_zero_after_it(replicated: Replicated) -> None:
    """The ScaledObject's query, verbatim, on the real Prometheus: zero while idle, up with the load,
    and back to zero one averaging window after the load (waited for here, after the other tests)."""
    run = replicated.run
    prometheus = run.prometheus
    query = keda_query(replicated.manifests)
    window_s = float(re.search(r"\[(\d+)s\]", query).group(1))  # type: ignore[union-attr]
    assert prometheus.value(query, replicated.idle_before) == 0
    during = prometheus.range(query, run.start, replicated.load_ended)
    (series,) = during
    values = [float(v) for _, v in series["values"]]
    peak = max(values)
    assert peak > 0, "the signal never rose under load"
    busiest = run.levels[-1]
    at_busiest = prometheus.value(query, busiest.ended)
    assert at_busiest > 0
    # The recorded per-replica signal is the same query over the replicas; compared at the rule's
    # own last evaluation (up to one scrape may differ between the two: rule and query run apart).
    ((stamp, recorded),) = prometheus.instant(
        f"job:cliplens_images_in_flight:per_replica_avg30s[{2 * SCRAPE_S}s]", busiest.ended
    )[0]["values"][-1:]
    replicas = prometheus.value("count(up{job='cliplens'} == 1)", float(stamp))
    assert replicas == len(PODS)
    expected = prometheus.value(query, float(stamp)) / replicas
    assert float(recorded) == pytest.approx(expected, rel=0.25, abs=0.5)
    settle = max(replicated.load_ended, replicated.quiet_since) + window_s + 2 * SCRAPE_S + 0.5
    time.sleep(max(0.0, settle - time.time()))
    assert prometheus.value(query, time.time()) == 0, "the signal did not fall back after the load"


# ---- a replica drains -------------------------------------------------------------------------


def test_a_replica_that_gets_sigterm_mid_load_fails_no_request_and_exits_zero(replicated: Replicated) -> None:
    """Last: it takes one replica away. In-flight requests finish on it; new ones go elsewhere
    (the proxy's retry on a refused connection, then its /readyz health check)."""
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=replicated.proxy.url, timeout=60) as client:
            while not stop.is_set():
                statuses.append(client.post("/v1/embeddings", json={"input": list(PHOTOS)}).status_code)

    workers = [threading.Thread(target=load) for _ in range(3)]
    for worker in workers:
        worker.start()
    time.sleep(1.5)
    leaving = replicated.replicas[0]
    status = leaving.stop()
    time.sleep(1.5)
    stop.set()
    for worker in workers:
        worker.join(timeout=60)
    assert status == 0
    assert len(statuses) > 10
    assert set(statuses) == {200}, statuses
