"""Static checks of the observability stack's files: compose, Dockerfile, Prometheus, Jaeger, Grafana.

No container runs here (CI has no Docker engine): the compose files go through a real Compose
parser (`docker compose config`, or the standalone `docker-compose` where the plugin is missing),
the Prometheus files through `promtool`, and the rest is read and cross-checked: every mounted
file exists, every referenced data source is provisioned, every port and host name one file names
is the one the other serves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.trace import SpanContext, TraceFlags

from cliplens.telemetry.metrics import Metrics
from cliplens.telemetry.stages import exemplar_for
from cliplens.vocabulary import Stage
from tests.harness.tools import debian, required

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
OVERRIDES = {
    "gpu": (ROOT / "docker-compose.gpu.yml", {}),
    "gcs": (
        ROOT / "docker-compose.gcs.yml",
        {"CLIPLENS_DEFAULT_BUCKET": "my-photos", "GOOGLE_APPLICATION_CREDENTIALS": "/keys/cliplens.json"},
    ),
}
OBSERVABILITY = ROOT / "observability"
GRAFANA = ROOT / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
SERIES_NAME = re.compile(r"[a-z_:]*(?:cliplens|http_server|process|python_gc)[_:][a-z0-9_:]*")
"""The series the dashboards and rules read: cliplens's own, OpenTelemetry's HTTP server series and
prometheus_client's process and garbage-collector series, and the rules recorded from them."""
OTEL_HTTP_SERIES = {
    *(f"http_server_request_duration_seconds_{part}" for part in ("bucket", "sum", "count")),
    "http_server_active_requests",
}
"""OpenTelemetry's stable HTTP server metrics, exported onto the app's registry by
opentelemetry-exporter-prometheus when the app starts: not families of `Metrics`."""
GPU_SERIES = {
    "cliplens_gpu_utilization_ratio",
    "cliplens_gpu_memory_used_bytes",
    "cliplens_gpu_memory_total_bytes",
    "cliplens_gpu_model_memory_bytes",
}
"""Registered only where the model runs on CUDA, so absent from `Metrics()` on a CPU host."""


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(load_yaml(COMPOSE))


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(compose["services"])


def one_shot(service: dict[str, Any]) -> bool:
    return str(service.get("restart", "")) == "no"


def volume_mounts(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(source, container path) of each short-syntax volume of a service."""
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        yield source, target


def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    if standalone:
        return [standalone]
    pytest.fail(
        "neither `docker compose` nor `docker-compose` is installed: install Debian's "
        "`docker-compose` package (scripts/test does it when run as root)"
    )


# ---- compose ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["base", *OVERRIDES])
def test_a_compose_cli_accepts_the_files(variant: str) -> None:
    files = ["-f", str(COMPOSE)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIPLENS_", "GOOGLE_", "PHOTO_"))}
    if variant != "base":
        override, variables = OVERRIDES[variant]
        files += ["-f", str(override)]
        env.update(variables)
    result = subprocess.run(
        [*compose_command(), *files, "config", "-q"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_images_are_pinned_and_long_running_services_have_health_checks(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        image = service.get("image", "")
        assert image or "build" in service, name
        if "build" not in service:
            repository, _, tag = image.rpartition(":")
            assert repository and tag and tag != "latest", f"{name}: pin {image}"
        if not one_shot(service):
            assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"


def test_expected_services_and_images(compose: dict[str, Any]) -> None:
    found = services(compose)
    assert {"api", "proxy", "gcs", "jaeger", "prometheus", "grafana", "photos"} <= set(found)
    assert found["proxy"]["image"].startswith("haproxy:")
    assert found["gcs"]["image"].startswith("fsouza/fake-gcs-server:")
    assert found["jaeger"]["image"].startswith("jaegertracing/jaeger:2.")
    assert found["prometheus"]["image"].startswith("prom/prometheus:")
    assert found["grafana"]["image"].startswith("grafana/grafana:")


def test_every_mounted_host_path_exists_and_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in services(compose).items():
        for source, _ in volume_mounts(service):
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"
                used.add(source)
    assert used == declared
    for path, _ in OVERRIDES.values():
        for name, service in load_yaml(path)["services"].items():
            for source, _ in volume_mounts(service):
                assert source.startswith("${") or (ROOT / source).exists(), f"{path.name}: {name} {source}"


def test_api_builds_from_the_dockerfile_and_dependencies_wait_for_health(compose: dict[str, Any]) -> None:
    found = services(compose)
    build = found["api"]["build"]
    assert build["context"] == "."
    assert (ROOT / build["context"] / build["dockerfile"]).is_file()
    assert found["photos"]["build"] == build, "the photo generator runs the service's own image"
    for name, service in found.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            assert dependency in found, f"{name} depends on unknown {dependency}"
            if condition["condition"] == "service_healthy":
                assert found[dependency].get("healthcheck"), f"{name} waits on {dependency} without a check"
            else:
                assert condition["condition"] == "service_completed_successfully"
                assert one_shot(found[dependency])


def test_the_sample_photos_reach_the_fake_gcs_bucket(compose: dict[str, Any]) -> None:
    found = services(compose)
    photos_volume = dict(volume_mounts(found["photos"]))
    gcs_volume = {source: target for source, target in volume_mounts(found["gcs"])}
    assert photos_volume == {"photos": "/data"}
    assert gcs_volume == {"photos": "/data"}
    assert 'Path("/data/photos")' in found["photos"]["command"][0]
    assert found["gcs"]["command"][found["gcs"]["command"].index("-data") + 1] == "/data"
    environment = found["api"]["environment"]
    assert environment["CLIPLENS_DEFAULT_BUCKET"] == "photos"
    port = found["gcs"]["command"][found["gcs"]["command"].index("-port") + 1]
    assert environment["STORAGE_EMULATOR_HOST"] == f"http://gcs:{port}"


def test_the_gpu_variant_reserves_a_gpu_and_builds_cuda_torch() -> None:
    api = load_yaml(OVERRIDES["gpu"][0])["services"]["api"]
    devices = api["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert api["build"]["args"]["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/whl/cu")
    assert api["build"]["args"]["PACKAGE"] == ".[gpu]"  # NVML, for the GPU gauges' utilisation
    assert api["environment"]["CLIPLENS_DEVICE"] == "cuda"


def test_dockerfile_is_pinned_cpu_by_default_non_root_and_health_checked() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    assert base and ":" in base.group(1) and not base.group(1).endswith(":latest")
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in dockerfile
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", dockerfile, re.MULTILINE)
    assert 'CMD ["cliplens", "serve", "--host", "0.0.0.0", "--port", "8000"]' in dockerfile
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert {"!pyproject.toml", "!README.md", "!src"} <= set(ignore)


# ---- Prometheus -------------------------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [required("promtool", debian("prometheus")), *args], cwd=ROOT, capture_output=True, text=True
    )


def test_promtool_accepts_the_config_and_the_rules() -> None:
    result = promtool("check", "config", "observability/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    rules = sorted(str(p.relative_to(ROOT)) for p in (OBSERVABILITY / "rules").glob("*.yml"))
    result = promtool("check", "rules", *rules)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass() -> None:
    tests = sorted(str(p.relative_to(ROOT)) for p in (OBSERVABILITY / "tests").glob("*_test.yml"))
    assert len(tests) >= 2
    result = promtool("test", "rules", *tests)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_in_compose_runs_the_project_config_with_exemplars(compose: dict[str, Any]) -> None:
    found = services(compose)
    prometheus = found["prometheus"]
    assert "--enable-feature=exemplar-storage" in prometheus["command"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert ("./observability", "/etc/prometheus") in set(volume_mounts(prometheus))
    config = load_yaml(OBSERVABILITY / "prometheus.yml")
    for rule_file in config["rule_files"]:
        assert not Path(rule_file).is_absolute() and (OBSERVABILITY / rule_file).is_file()
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["cliplens"]["dns_sd_configs"] == [
        {"names": ["api"], "type": "A", "port": 8000, "refresh_interval": "5s"}
    ], "every replica of `docker compose up --scale api=N` is a target of its own"
    jaeger_exporter = load_yaml(OBSERVABILITY / "jaeger.yaml")["exporters"]["prometheus"]["endpoint"]
    assert jobs["jaeger-spanmetrics"]["static_configs"] == [
        {"targets": [f"jaeger:{jaeger_exporter.rpartition(':')[2]}"]}
    ]
    scrape = config["global"]["scrape_interval"]
    window = float(found["api"]["environment"]["CLIPLENS_EXTREMES_WINDOW_S"])
    assert float(scrape.removesuffix("s")) * 2 <= window, "every min/max must be scraped at least once"


def test_every_metric_the_dashboards_and_rules_read_is_exported_or_recorded() -> None:
    exported = set()
    for family in Metrics().registry.collect():
        exported |= {family.name, f"{family.name}_total", f"{family.name}_bucket"}
        exported |= {f"{family.name}_sum", f"{family.name}_count"}
    recorded = {
        rule["record"]
        for path in (OBSERVABILITY / "rules").glob("*.yml")
        for group in load_yaml(path)["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    expressions = [
        rule["expr"]
        for path in (OBSERVABILITY / "rules").glob("*.yml")
        for group in load_yaml(path)["groups"]
        for rule in group["rules"]
    ]
    for path in DASHBOARDS:
        expressions += [target["expr"] for _, target in targets(json.loads(path.read_text()))]
    names = {name for expr in expressions for name in SERIES_NAME.findall(expr)}
    assert len(names) > 30, names
    assert {"http_server_request_duration_seconds_count", "process_resident_memory_bytes"} <= names
    unknown = sorted(
        name for name in names if name not in exported | OTEL_HTTP_SERIES | GPU_SERIES | recorded
    )
    assert not unknown


def test_every_alert_has_a_promtool_unit_test_that_fires_it() -> None:
    alerts = {
        rule["alert"]
        for group in load_yaml(OBSERVABILITY / "rules" / "alerts.yml")["groups"]
        for rule in group["rules"]
    }
    fired = {
        case["alertname"]
        for test in load_yaml(OBSERVABILITY / "tests" / "alerts_test.yml")["tests"]
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    assert alerts == fired, f"alerts without a firing test: {sorted(alerts - fired)}"


# ---- Jaeger -----------------------------------------------------------------------------------


def test_jaeger_v2_wires_span_metrics_to_prometheus_and_back_for_the_monitor_tab(
    compose: dict[str, Any],
) -> None:
    config = load_yaml(OBSERVABILITY / "jaeger.yaml")
    pipelines = config["service"]["pipelines"]
    assert {"otlp"} == set(pipelines["traces"]["receivers"])
    assert {"jaeger_storage_exporter", "spanmetrics"} <= set(pipelines["traces"]["exporters"])
    metrics = [p for name, p in pipelines.items() if name.startswith("metrics")]
    assert any(p["receivers"] == ["spanmetrics"] and "prometheus" in p["exporters"] for p in metrics)
    assert "spanmetrics" in config["connectors"]
    query = config["extensions"]["jaeger_query"]
    storage = config["extensions"]["jaeger_storage"]
    assert set(config["service"]["extensions"]) >= {"jaeger_query", "jaeger_storage"}
    assert query["storage"]["traces"] in storage["backends"]
    backend = storage["metric_backends"][query["storage"]["metrics"]]["prometheus"]
    assert backend["endpoint"] == "http://prometheus:9090"
    assert "9090:9090" in services(compose)["prometheus"]["ports"]
    assert config["exporters"]["jaeger_storage_exporter"]["trace_storage"] == query["storage"]["traces"]
    jaeger = services(compose)["jaeger"]
    mounts = {target: source for source, target in volume_mounts(jaeger)}
    ui = mounts[query["ui"]["config_file"]]
    assert json.loads((ROOT / ui).read_text())["monitor"]["menuEnabled"] is True
    assert mounts[jaeger["command"][jaeger["command"].index("--config") + 1]] == "./observability/jaeger.yaml"
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["http"]["endpoint"] == "0.0.0.0:4318"
    assert protocols["grpc"]["endpoint"] == "0.0.0.0:4317"
    environment = services(compose)["api"]["environment"]
    assert environment["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4318"
    assert environment["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"


# ---- Grafana ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def datasources() -> dict[str, dict[str, Any]]:
    provisioned = load_yaml(GRAFANA / "provisioning" / "datasources" / "datasources.yml")["datasources"]
    return {source["uid"]: source for source in provisioned}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel, target


def datasource_uids(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        source = node.get("datasource")
        if isinstance(source, dict) and "uid" in source:
            yield source["uid"]
        for value in node.values():
            yield from datasource_uids(value)
    elif isinstance(node, list):
        for value in node:
            yield from datasource_uids(value)


def test_grafana_mounts_provisioning_and_dashboards_where_the_provider_reads(compose: dict[str, Any]) -> None:
    grafana = services(compose)["grafana"]
    mounts = {target: source for source, target in volume_mounts(grafana)}
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    providers = load_yaml(GRAFANA / "provisioning" / "dashboards" / "dashboards.yml")["providers"]
    assert [mounts[p["options"]["path"]] for p in providers] == ["./grafana/dashboards"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / "grafana" / "dashboards" / Path(home).name).is_file()
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_prometheus_exemplars_link_to_the_jaeger_data_source_by_trace_id(
    datasources: dict[str, dict[str, Any]], compose: dict[str, Any]
) -> None:
    prometheus = next(s for s in datasources.values() if s["type"] == "prometheus")
    jaeger = next(s for s in datasources.values() if s["type"] == "jaeger")
    assert prometheus["url"] == "http://prometheus:9090"
    assert jaeger["url"] == "http://jaeger:16686"
    assert "16686:16686" in services(compose)["jaeger"]["ports"]
    scrape = load_yaml(OBSERVABILITY / "prometheus.yml")["global"]["scrape_interval"]
    assert prometheus["jsonData"]["timeInterval"] == scrape
    sampled = SpanContext(trace_id=0xABC, span_id=0xDEF, is_remote=False, trace_flags=TraceFlags(1))
    (label,) = (exemplar_for(sampled) or {}).keys()
    destinations = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    assert {d["name"] for d in destinations} == {label}
    assert any(d.get("datasourceUid") == jaeger["uid"] for d in destinations)


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_dashboards_are_valid_with_unique_panel_ids_and_provisioned_datasources(
    path: Path, datasources: dict[str, dict[str, Any]]
) -> None:
    dashboard = json.loads(path.read_text())
    ids = [panel["id"] for panel in panels(dashboard)]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert set(datasource_uids(dashboard)) <= set(datasources)
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        refs = [target["refId"] for target in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]
        assert all(target["expr"].strip() for target in panel.get("targets", [])), panel["title"]


def test_the_stage_latency_dashboard_has_what_the_issue_asks_for() -> None:
    dashboard = json.loads((GRAFANA / "dashboards" / "cliplens-stage-latency.json").read_text())
    assert dashboard["title"] == "cliplens — stage latency"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    for name in ("stage", "instance"):
        assert variables[name]["multi"] and variables[name]["includeAll"], name
    assert variables["stage"]["query"].split(",") == list(Stage), "every stage, in order"
    exprs = [target["expr"] for _, target in targets(dashboard)]
    for family in (
        "cliplens_request_stage",
        "cliplens_image_stage",
        "cliplens_stage_queue",
        "cliplens_request",
    ):
        uses = [e for e in exprs if f"{family}_" in e and "job_" not in e]
        assert any("min by" in e and f"{family}_min_seconds" in e for e in uses), family
        assert any("max by" in e and f"{family}_max_seconds" in e for e in uses), family
        for q in ("0.5", "0.95", "0.99"):
            assert any(f"histogram_quantile({q}, sum by (" in e and ", le)" in e for e in uses), (family, q)
        assert any(f"{family}_seconds_sum" in e and f"{family}_seconds_count" in e for e in uses), family
    for expr in exprs:
        if any(":" not in name for name in SERIES_NAME.findall(expr)):
            assert 'instance=~"$instance"' in expr, expr
        assert "avg(" not in expr and "avg by" not in expr, f"averages of averages are wrong: {expr}"
    assert any(target.get("exemplar") for _, target in targets(dashboard))
    latency = [p for p in panels(dashboard) if "stage_seconds" in json.dumps(p.get("targets", []))]
    assert latency and all(p["fieldConfig"]["defaults"]["unit"] == "s" for p in latency)


CACHE_TIERS = {"memory", "redis"}
CACHE_SERIES: dict[str, dict[str, set[str]]] = {
    "cliplens_cache_requests_total": {"tier": CACHE_TIERS, "result": {"hit", "miss", "error", "bypass"}},
    "cliplens_cache_writes_total": {"tier": CACHE_TIERS, "result": {"ok", "error", "bypass"}},
    **{f"cliplens_cache_seconds_{part}": {"tier": CACHE_TIERS} for part in ("bucket", "sum", "count")},
    "cliplens_cache_bytes": {},
    "cliplens_cache_entries": {},
    "cliplens_cache_capacity_bytes": {},
    "cliplens_cache_circuit_open": {"tier": {"redis"}},
}
"""The embedding cache's series (issue 16) and the values each of their labels takes."""
SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\{([^}]*)\}")
MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"\s*,?')


def row_panels(dashboard: dict[str, Any], title_start: str) -> list[dict[str, Any]]:
    """The panels under the row whose title starts with `title_start` (inside it, when collapsed)."""
    found: list[dict[str, Any]] | None = None
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            if found is not None:
                break
            if panel["title"].startswith(title_start):
                found = list(panel.get("panels", []))
        elif found is not None:
            found.append(panel)
    assert found, f"no row {title_start!r}"
    return found


def test_the_cache_row_reads_only_the_cache_series_and_each_label_value_they_have() -> None:
    dashboard = json.loads((GRAFANA / "dashboards" / "cliplens-stage-latency.json").read_text())
    cache = row_panels(dashboard, "Cache")
    assert len(cache) >= 6 and all(panel.get("description") for panel in cache)
    used: set[str] = set()
    for panel in cache:
        for target in panel["targets"]:
            expr = target["expr"]
            selectors = SELECTOR.findall(expr)
            assert selectors, expr
            names = set(re.findall(r"[a-z_:]*cliplens[_:][a-z0-9_:]*", expr))
            assert names == {name for name, _ in selectors}, f"a series without a selector: {expr}"
            for name, matchers in selectors:
                assert name in CACHE_SERIES, f"{panel['title']}: {name} is not a cache series"
                parsed = MATCHER.findall(matchers)
                assert not MATCHER.sub("", matchers).strip(), f"unparsed matchers in {expr}"
                labels = {label: (op, value) for label, op, value in parsed}
                assert labels.pop("instance", None) == ("=~", "$instance"), expr
                for label, (op, value) in labels.items():
                    allowed = CACHE_SERIES[name].get(label)
                    assert allowed is not None, f"{name} has no label {label}: {expr}"
                    values = value.split("|") if op in ("=~", "!~") else [value]
                    assert set(values) <= allowed, f"{name}{{{label}}} never is {value}: {expr}"
                used.add(name)
            grouped = {g.strip() for group in re.findall(r"\bby \(([^)]*)\)", expr) for g in group.split(",")}
            assert grouped <= {"tier", "result", "le"}, expr
            joined = {g.strip() for group in re.findall(r"\bon \(([^)]*)\)", expr) for g in group.split(",")}
            assert joined <= {"instance"}, expr
    assert used == set(CACHE_SERIES), f"series the row does not draw: {set(CACHE_SERIES) - used}"
    ratios = [p for p in cache if p["fieldConfig"]["defaults"]["unit"] == "percentunit"]
    assert ratios and all('result="hit"' in t["expr"] for p in ratios for t in p["targets"])
    advice = " ".join(panel["description"] for panel in cache)
    assert "`cache` stage" in advice and "cliplens_images_total" in advice, "how to read the stage panels"
    stage_tables = [
        p for p in panels(dashboard) if p["type"] == "table" and "stage" in json.dumps(p["targets"])
    ]
    assert len(stage_tables) == 3 and all("`cache` stage" in p["description"] for p in stage_tables)


def test_the_operator_rows_show_http_process_threads_event_loop_and_gpu() -> None:
    """Issue 14: responses by status class and route, the process, the pools and the event loop
    ("slow storage or busy loop?"), and a GPU row that stays closed and empty on CPU hosts."""
    dashboard = json.loads((GRAFANA / "dashboards" / "cliplens-stage-latency.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    grafana_variables = {*variables, "__rate_interval", "__range", "__interval"}
    for _, target in targets(dashboard):
        used = set(re.findall(r"\$\{?(\w+)", target["expr"]))
        assert used <= grafana_variables, f"not a dashboard variable: {target['expr']}"

    def exprs(panel: dict[str, Any]) -> str:
        return "\n".join(target["expr"] for target in panel.get("targets", []))

    def panel(row: list[dict[str, Any]], title_start: str) -> dict[str, Any]:
        (found,) = [p for p in row if p["title"].startswith(title_start)]
        assert found["description"], found["title"]
        return found

    http = row_panels(dashboard, "HTTP")
    by_class = exprs(panel(http, "HTTP responses per second, by status class"))
    assert "sum by (status_class)" in by_class and '"http_response_status_code", "5.."' in by_class
    ratios = panel(http, "HTTP 5xx and 4xx ratio")
    assert ratios["fieldConfig"]["defaults"]["unit"] == "percentunit"
    for status in ("5..", "4.."):
        assert f'http_response_status_code=~"{status}"' in exprs(ratios)
    assert exprs(ratios).count("or vector(0)") == 2, "0, not absent, while no response has that status"
    by_route = exprs(panel(http, "HTTP response time by route"))
    assert "histogram_quantile(0.95, sum by (http_route, le)" in by_route
    assert "http_server_active_requests{" in exprs(panel(http, "HTTP requests in flight"))

    process = "\n".join(exprs(p) for p in row_panels(dashboard, "Process"))
    assert "rate(process_cpu_seconds_total{" in process
    for series in ("process_resident_memory_bytes", "process_open_fds", "process_max_fds"):
        assert f"{series}{{" in process, series
    assert "python_gc_collections_total{" in process

    runtime = row_panels(dashboard, "Threads and event loop")
    lag = panel(runtime, "Slow storage or busy loop?")
    queries = [target["expr"] for target in lag["targets"]]
    assert any("cliplens_event_loop_lag_max_seconds{" in q for q in queries)
    assert any(
        "histogram_quantile(0.99" in q and "cliplens_event_loop_lag_seconds_bucket{" in q for q in queries
    )
    assert any('stage="load"' in q and "cliplens_image_stage_seconds_bucket{" in q for q in queries)
    assert any('stage="load"' in q and "cliplens_image_stage_max_seconds{" in q for q in queries)
    advice = lag["description"].lower()
    assert "slow storage" in advice and "busy loop" in advice and "lag low" in advice and "lag high" in advice
    assert lag["fieldConfig"]["defaults"]["unit"] == "s"
    threads = panel(runtime, "Threads by pool")
    assert threads["fieldConfig"]["defaults"]["custom"]["stacking"]["mode"] == "normal"
    assert "sum by (pool) (cliplens_threads{" in exprs(threads)
    busy = exprs(panel(runtime, "CPU pool busy ratio"))
    assert (
        "cliplens_cpu_pool_busy_seconds_total{" in busy
        and " / sum by (pool) (cliplens_cpu_pool_workers{" in busy
    )
    assert "cliplens_cpu_pool_queue{" in exprs(panel(runtime, "CPU pool queue"))

    (gpu_row,) = [p for p in dashboard["panels"] if p["type"] == "row" and p["title"].startswith("GPU")]
    assert gpu_row["collapsed"] and gpu_row["repeat"] == "gpu" and "CPU hosts" in gpu_row["title"]
    assert re.fullmatch(
        r"label_values\(cliplens_gpu_memory_total_bytes\{.*\}, device\)", variables["gpu"]["query"]
    )
    gpu = gpu_row["panels"]
    assert gpu and all("CPU hosts" in p["description"] for p in gpu)
    assert all('device=~"$gpu"' in target["expr"] for p in gpu for target in p["targets"])
    assert {name for p in gpu for name in SERIES_NAME.findall(exprs(p))} == GPU_SERIES
    elsewhere = [p["title"] for p in panels(dashboard) if p not in gpu and "cliplens_gpu_" in exprs(p)]
    assert not elsewhere, "GPU series outside the GPU row would leave panels empty on CPU hosts"


def test_the_committed_dashboard_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("generate_dashboard", GRAFANA / "generate_dashboard.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, "run: python grafana/generate_dashboard.py"
