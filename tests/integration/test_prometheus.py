"""The dashboard and the rules against a real Prometheus, fed by the real service under a known load.

One run (module fixture): a fake-gcs-server and the service on loopback, a real Prometheus started
from the project's own observability/ folder (copied, with the `cliplens` job pointed at the test
service and 1 s intervals), then a closed-loop load at concurrency 1, 2, 4 and 8, each level
separated by a pause. The tests then hold Prometheus to what the load client saw:

- every PromQL expression of every panel of every dashboard returns data, with Grafana's
  variables substituted (All, each stage, one instance);
- per level and per stage, the exact min and max and the mean that Prometheus reports equal the
  ones computed from the `Server-Timing` headers (per request) and the `timings` bodies (per
  image), to the rounding of those numbers;
- over the whole run, the dashboard's own "over the selected range" tables say the same;
- exemplars carry the trace ids of the load's requests; the rules load and evaluate.

Prometheus is the Debian package's binary (`prometheus` on PATH; scripts/test installs it). A
missing binary fails the tests: nothing here is skipped.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from cliplens.experiment.inprocess import InProcessService
from cliplens.experiment.processes import stop_process, wait_until_answering
from cliplens.settings import Settings
from cliplens.telemetry.metrics import LATENCY_BUCKETS
from tests.conftest import BUCKET
from tests.servers import FakeGcs, free_port

pytestmark = pytest.mark.slow  # about a minute: a real Prometheus watching four load levels

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "observability"
DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
STAGES = ("load", "decode", "preprocess", "embed")
WORK_STAGES = ("load", "decode", "preprocess")

SCRAPE_S = 1
# The service's min/max window, shortened from its 15 s default so that each concurrency level
# can be checked on its own: a level starts more than a window after the previous one ended, so
# min_over_time over the level's span sees only its own observations (the gauges of
# [span start - window, span end]). 4 s still exceeds the 1 s scrape interval by enough that
# every observation is scraped at least once (each stays visible for 3 to 4 s), even when a
# scrape of the busy service is late.
EXTREMES_WINDOW_S = 4.0
PAUSE_S = EXTREMES_WINDOW_S + 1.5
LEVELS = (1, 2, 4, 8)
REQUESTS_PER_WORKER = int(os.environ.get("CLIPLENS_TEST_REQUESTS_PER_WORKER", "3"))
"""Requests each closed-loop client sends per level; raise it for a denser picture (docs/)."""
PHOTOS = ("album/1/a.jpg", "album/1/b.jpg", "album/2/c.jpg")
MISSING = "album/missing.jpg"
TEXT = "a photo of mountains at sunset"
HEADER_TOLERANCE_S = 0.05e-3 + 1e-9
"""Server-Timing durations are rounded to 0.1 ms."""
BODY_TOLERANCE_S = 0.0005e-3 + 1e-9
"""Per-image `timings` are rounded to 0.001 ms."""
RATE_INTERVAL = f"{max(2 * SCRAPE_S, 4 * SCRAPE_S)}s"
"""Grafana's $__rate_interval: max($__interval + scrape interval, 4 x scrape interval), step 1 s."""


class PrometheusServer:
    """A real Prometheus on a free loopback port, from a copy of the project's observability/."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_dir = workdir / "observability"
        shutil.copytree(OBSERVABILITY, self.config_dir)
        self.config_path = self.config_dir / "prometheus.yml"
        config = yaml.safe_load(self.config_path.read_text())
        interval = f"{SCRAPE_S}s"
        config["global"].update(
            scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval
        )
        jobs = [job for job in config["scrape_configs"] if job["job_name"] == "cliplens"]
        assert len(jobs) == 1, "observability/prometheus.yml must have one `cliplens` job"
        for discovery in [key for key in jobs[0] if key.endswith("_sd_configs")]:
            del jobs[0][discovery]  # compose finds the replicas by DNS; here there is one, on loopback
        jobs[0]["static_configs"] = [{"targets": [target]}]
        config["scrape_configs"] = jobs
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.data_dir = workdir / "data"
        self.log_path = workdir / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> PrometheusServer:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail(
                "the `prometheus` binary is not on PATH: install Debian's `prometheus` package "
                "(scripts/test does it when run as root)"
            )
        self.started_at = time.time()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.data_dir}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--enable-feature=exemplar-storage",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        problem = wait_until_answering(f"{self.url}/-/ready", self.process, 30, request_timeout_s=1)
        if problem:
            raise AssertionError(f"prometheus {problem}: {self.log_path.read_text()[-2000:]}")
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 10)
        self.process = None

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body}")
        return body["data"]

    def instant(self, expr: str, at: float) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr, time=f"{at:.3f}")["result"])

    def value(self, expr: str, at: float) -> float:
        result = self.instant(expr, at)
        assert len(result) == 1, f"{expr} at {at}: {result}"
        return float(result[0]["value"][1])

    def by_label(self, expr: str, at: float, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.instant(expr, at)}

    def range(self, expr: str, start: float, end: float, step: str = f"{SCRAPE_S}s") -> list[dict[str, Any]]:
        return list(
            self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step)["result"]
        )


@dataclass
class Sent:
    """One request of the load, as the client saw it."""

    level: int
    modality: str
    stages_s: dict[str, float]
    images: list[dict[str, dict[str, float]]]
    trace_id: str


@dataclass
class Level:
    concurrency: int
    started: float
    ended: float = 0.0
    sent: list[Sent] = field(default_factory=list)


@dataclass
class Run:
    prometheus: PrometheusServer
    target: str
    levels: list[Level]
    start: float
    end: float
    """The timestamp of the last scrape: range queries that end here have no extrapolation."""

    @property
    def sent(self) -> list[Sent]:
        return [s for level in self.levels for s in level.sent]


def server_timing_s(header: str) -> dict[str, float]:
    return {name: float(ms) / 1e3 for name, ms in re.findall(r"(\w+);dur=([0-9.]+)", header)}


async def _worker(client: httpx.AsyncClient, level: Level, index: int) -> None:
    for i in range(REQUESTS_PER_WORKER):
        turn = index * REQUESTS_PER_WORKER + i
        if index == 0 and i == REQUESTS_PER_WORKER - 1:  # one text request per level
            body: dict[str, Any] = {"input": [TEXT], "modality": "text"}
        else:
            inputs = [*PHOTOS, MISSING] if turn % 2 == 0 else list(PHOTOS)
            body = {"input": inputs, "encoding_format": "base64", "timings": True}
        response = await client.post("/v1/embeddings", json=body)
        assert response.status_code == 200, response.text
        payload = response.json()
        level.sent.append(
            Sent(
                level=level.concurrency,
                modality=body.get("modality", "image"),
                stages_s=server_timing_s(response.headers["server-timing"]),
                images=[
                    {stage: {k: v / 1e3 for k, v in t.items()} for stage, t in item["stages"].items()}
                    for item in payload.get("timings", [])
                ],
                trace_id=response.headers["x-trace-id"],
            )
        )


def _wait_for_scrape(prometheus: PrometheusServer, requests: int) -> None:
    """Until Prometheus has scraped the count of all `requests`, then one more scrape.

    The extremes gauges are collected before the histograms in one scrape, so the last
    observations may reach the gauges one scrape after the count that shows them.
    """
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        result = prometheus.instant("sum(cliplens_request_seconds_count)", time.time())
        if result and float(result[0]["value"][1]) == requests:
            time.sleep(2 * SCRAPE_S + 0.2)
            return
        time.sleep(0.2)
    raise AssertionError(f"Prometheus did not scrape {requests} requests in 30 s")


async def _drive(url: str, prometheus: PrometheusServer) -> list[Level]:
    levels: list[Level] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for concurrency in LEVELS:
            level = Level(concurrency, started=time.time())
            await asyncio.gather(*(_worker(client, level, i) for i in range(concurrency)))
            levels.append(level)
            await asyncio.to_thread(_wait_for_scrape, prometheus, sum(len(lv.sent) for lv in levels))
            level.ended = time.time()
            if concurrency != LEVELS[-1]:
                await asyncio.sleep(PAUSE_S)
    return levels


@pytest.fixture(scope="module")
def run(tiny_model: str, fake_gcs: FakeGcs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    settings = Settings(
        model=tiny_model,
        pretrained="none",
        default_bucket=BUCKET,
        allowed_buckets=(BUCKET,),
        gcs_emulator_host=fake_gcs.url,
        cpu_workers=2,
        max_inputs=16,
        extremes_window_s=EXTREMES_WINDOW_S,
    )
    with InProcessService(settings) as url:
        target = url.removeprefix("http://")
        prometheus = PrometheusServer(tmp_path_factory.mktemp("prometheus"), target).start()
        try:
            deadline = time.monotonic() + 20
            while not prometheus.instant('up{job="cliplens"} == 1', time.time()):
                assert time.monotonic() < deadline, (
                    f"no scrape of {target}: {prometheus.log_path.read_text()}"
                )
                time.sleep(0.2)
            start = time.time()
            levels = asyncio.run(_drive(url, prometheus))
            last_scrape = prometheus.value('timestamp(up{job="cliplens"})', time.time())
            yield Run(prometheus, target, levels, start, last_scrape)
        finally:
            prometheus.stop()


# ---- the dashboards ---------------------------------------------------------------------------


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target


def substitute(expr: str, variables: dict[str, str], range_s: float) -> str:
    values = {
        "$__rate_interval": RATE_INTERVAL,
        "$__interval": f"{SCRAPE_S}s",
        "$__range": f"{int(range_s * 1000)}ms",
        **{f"${name}": value for name, value in variables.items()},
    }
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace(name, values[name])
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def has_data(result: list[dict[str, Any]]) -> bool:
    points = [p for series in result for p in series.get("values", [series.get("value")]) if p]
    return any(math.isfinite(float(value)) for _, value in points)


def evaluate(run: Run, target: dict[str, Any], variables: dict[str, str]) -> list[dict[str, Any]]:
    range_s = run.end - run.prometheus.started_at
    expr = substitute(target["expr"], variables, range_s)
    if target.get("instant"):
        return run.prometheus.instant(expr, run.end)
    return run.prometheus.range(expr, run.start, run.end)


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_every_panel_query_returns_data_for_all_stages_and_instances(run: Run, path: Path) -> None:
    dashboard = json.loads(path.read_text())
    empty = [
        f"{title}: {target['expr']}"
        for title, target in targets(dashboard)
        if not has_data(evaluate(run, target, {"instance": ".*", "stage": ".*", "work_stage": ".*"}))
    ]
    assert not empty, "panels without data:\n" + "\n".join(empty)
    assert sum(1 for _ in targets(dashboard)) > 50


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_every_panel_query_returns_data_for_each_stage_and_one_instance(run: Run, path: Path) -> None:
    dashboard = json.loads(path.read_text())
    instance = re.escape(run.target).replace("\\", "\\\\")  # as Grafana escapes a value for PromQL
    empty = []
    for stage in STAGES:
        variables = {"instance": instance, "stage": stage, "work_stage": stage}
        for title, target in targets(dashboard):
            if stage not in WORK_STAGES and "$work_stage" in target["expr"]:
                continue  # `embed` has no per-image work: the work panels are not drawn for it
            if not has_data(evaluate(run, target, variables)):
                empty.append(f"[stage={stage}] {title}: {target['expr']}")
    assert not empty, "panels without data:\n" + "\n".join(empty)


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_dashboard_variable_queries_find_the_instance_and_the_work_stages(run: Run, path: Path) -> None:
    dashboard = json.loads(path.read_text())
    found = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"])
        assert match, f"unsupported variable query {variable['query']}"
        selector = substitute(match.group(1), {"stage": ".*", "instance": ".*"}, 0)
        found[variable["name"]] = set(
            run.prometheus.api(
                f"label/{match.group(2)}/values",
                **{"match[]": selector, "start": f"{run.start:.3f}", "end": f"{run.end:.3f}"},
            )
        )
    assert found.get("instance") == {run.target}
    assert found.get("work_stage") == set(WORK_STAGES)


# ---- Prometheus agrees with the load client --------------------------------------------------


def span(level: Level) -> str:
    return f"{int((level.ended - level.started) * 1000)}ms"


def test_request_stage_min_max_mean_match_server_timing_at_every_level(run: Run) -> None:
    prometheus = run.prometheus
    whole_run = f"{int((run.end - run.start) * 1000)}ms"
    scrapes_ok = prometheus.value(f'min_over_time(up{{job="cliplens"}}[{whole_run}])', run.end)
    assert scrapes_ok == 1, "a scrape of the service failed during the load: extremes may be missed"
    for level in run.levels:
        assert_request_stages_match(prometheus, level)
        for modality in ("image", "text"):
            seen = [s.stages_s["total"] for s in level.sent if s.modality == modality]
            what = f"level {level.concurrency}, whole {modality} request"
            assert_family_matches(
                prometheus, "cliplens_request", f'{{modality="{modality}"}}', level, seen, what, mean=False
            )


def assert_request_stages_match(prometheus: PrometheusServer, level: Level) -> None:
    """Per request stage, over one level: Prometheus's min, max, count and mean equal Server-Timing's."""
    images = [s for s in level.sent if s.modality == "image"]
    for stage in STAGES:
        seen = [s.stages_s[stage] for s in images if stage in s.stages_s]
        assert seen, f"level {level.concurrency}: no {stage} in Server-Timing"
        what = f"level {level.concurrency}, {stage}"
        assert_family_matches(prometheus, "cliplens_request_stage", f'{{stage="{stage}"}}', level, seen, what)


def assert_family_matches(
    prometheus: PrometheusServer,
    family: str,
    selector: str,
    level: Level,
    seen: list[float],
    what: str,
    tolerance: float = HEADER_TOLERANCE_S,
    mean: bool = True,
) -> None:
    """`family`'s exact min and max gauges, and its histogram's count (and mean), summed over every
    series that `selector` picks, equal what the client saw (`seen`, seconds) during `level`."""
    low = prometheus.value(f"min(min_over_time({family}_min_seconds{selector}[{span(level)}]))", level.ended)
    high = prometheus.value(f"max(max_over_time({family}_max_seconds{selector}[{span(level)}]))", level.ended)
    assert low == pytest.approx(min(seen), abs=tolerance), what
    assert high == pytest.approx(max(seen), abs=tolerance), what
    count = _delta(prometheus, f"sum({family}_seconds_count{selector})", level)
    assert count == len(seen), what
    if mean:
        total = _delta(prometheus, f"sum({family}_seconds_sum{selector})", level)
        assert total / count == pytest.approx(sum(seen) / len(seen), abs=tolerance), what


def _delta(prometheus: PrometheusServer, expr: str, level: Level) -> float:
    """A counter's growth over a level: scraped values just before it began and after it ended."""
    return prometheus.value(expr, level.ended) - prometheus.value(expr, level.started)


def test_per_image_work_and_wait_extremes_match_the_response_timings_at_every_level(run: Run) -> None:
    prometheus = run.prometheus
    for level in run.levels:
        per_image = [image for s in level.sent for image in s.images]
        for family, key, stages in (
            ("cliplens_image_stage", "work_ms", WORK_STAGES),
            ("cliplens_stage_queue", "queue_ms", STAGES),
        ):
            for stage in stages:
                seen = [image[stage][key] for image in per_image if stage in image]
                what = f"level {level.concurrency}, {family} {stage}"
                assert_family_matches(
                    prometheus, family, f'{{stage="{stage}"}}', level, seen, what, BODY_TOLERANCE_S
                )


def range_table(run: Run, dashboard: dict[str, Any], title: str, label: str) -> dict[str, dict[str, float]]:
    """A dashboard "over the selected range" table, evaluated over the whole run: {column: {label: value}}."""
    panel = next(p for p in panels(dashboard) if p["title"] == title)
    organize = next(t for t in panel["transformations"] if t["id"] == "organize")
    columns = {ref.removeprefix("Value #"): name for ref, name in organize["options"]["renameByName"].items()}
    variables = {"instance": ".*", "stage": ".*", "work_stage": ".*"}
    table: dict[str, dict[str, float]] = {}
    for target in panel["targets"]:
        expr = substitute(target["expr"], variables, run.end - run.prometheus.started_at)
        table[columns[target["refId"]]] = run.prometheus.by_label(expr, run.end, label)
    return table


def bucket_bounds(value: float) -> tuple[float, float]:
    """The (lower, upper] bounds of the latency bucket holding `value`."""
    lower = 0.0
    for upper in LATENCY_BUCKETS:
        if value <= upper:
            return lower, upper
        lower = upper
    return lower, math.inf


def quantile_bounds(values: list[float], q: float, tolerance: float) -> tuple[float, float]:
    """Where histogram_quantile may land: the bucket of the observation of rank ceil(q x n)."""
    ranked = sorted(values)[max(math.ceil(q * len(values)) - 1, 0)]
    return bucket_bounds(ranked - tolerance)[0], bucket_bounds(ranked + tolerance)[1]


def assert_table_matches(
    table: dict[str, dict[str, float]], seen: dict[str, list[float]], tolerance: float
) -> None:
    for key, values in seen.items():
        assert table["observations"][key] == len(values), key
        assert table["min"][key] == pytest.approx(min(values), abs=tolerance), key
        assert table["max"][key] == pytest.approx(max(values), abs=tolerance), key
        assert table["mean"][key] == pytest.approx(sum(values) / len(values), abs=tolerance), key
        for column, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
            low, high = quantile_bounds(values, q, tolerance)
            assert low <= table[column][key] <= high, (key, column, table[column][key], low, high)


def test_the_dashboard_range_tables_match_the_client_over_the_whole_run(run: Run) -> None:
    dashboard = json.loads((ROOT / "grafana" / "dashboards" / "cliplens-stage-latency.json").read_text())
    images = [s for s in run.sent if s.modality == "image"]
    per_image = [image for s in run.sent for image in s.images]
    assert_table_matches(
        range_table(run, dashboard, "Per request, over the selected range", "stage"),
        {stage: [s.stages_s[stage] for s in images if stage in s.stages_s] for stage in STAGES},
        HEADER_TOLERANCE_S,
    )
    assert_table_matches(
        range_table(run, dashboard, "Whole request, over the selected range", "modality"),
        {m: [s.stages_s["total"] for s in run.sent if s.modality == m] for m in ("image", "text")},
        HEADER_TOLERANCE_S,
    )
    assert_table_matches(
        range_table(run, dashboard, "Per image work, over the selected range", "stage"),
        {stage: [image[stage]["work_ms"] for image in per_image if stage in image] for stage in WORK_STAGES},
        BODY_TOLERANCE_S,
    )
    assert_table_matches(
        range_table(run, dashboard, "Per image queue wait, over the selected range", "stage"),
        {stage: [image[stage]["queue_ms"] for image in per_image if stage in image] for stage in STAGES},
        BODY_TOLERANCE_S,
    )


def test_in_flight_stays_within_each_level_and_errors_are_counted_by_code(run: Run) -> None:
    # The in-flight gauge is sampled at scrapes, so it may miss short requests: it can only be
    # held to never exceeding the level's concurrency, and to zero once the load is over.
    prometheus = run.prometheus
    for level in run.levels:
        peak = prometheus.value(
            f"max_over_time(sum(cliplens_requests_in_flight)[{span(level)}:])", level.ended
        )
        assert peak <= level.concurrency, level.concurrency
    assert prometheus.value("sum(cliplens_requests_in_flight)", run.end) == 0
    missing = sum(1 for s in run.sent for image in s.images if set(image) == {"load"})
    assert missing > 0
    not_found = prometheus.value('sum(cliplens_images_total{outcome="not_found"})', run.end)
    assert not_found == missing


def test_exemplars_carry_the_trace_ids_and_values_of_the_load(run: Run) -> None:
    by_trace = {s.trace_id: s for s in run.sent}
    found = run.prometheus.api(
        "query_exemplars",
        query="cliplens_request_stage_seconds_bucket",
        start=f"{run.start:.3f}",
        end=f"{run.end:.3f}",
    )
    exemplars = [(series["seriesLabels"]["stage"], e) for series in found for e in series["exemplars"]]
    assert len(exemplars) >= len(STAGES)
    for stage, exemplar in exemplars:
        sent = by_trace[exemplar["labels"]["trace_id"]]
        assert float(exemplar["value"]) == pytest.approx(sent.stages_s[stage], abs=HEADER_TOLERANCE_S)


def test_recording_and_alerting_rules_load_and_evaluate(run: Run) -> None:
    groups = run.prometheus.api("rules")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    on_disk = [
        rule
        for path in sorted((OBSERVABILITY / "rules").glob("*.yml"))
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]
    assert len(rules) == len(on_disk)
    unhealthy = [(rule["name"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"]
    assert not unhealthy
    alerts = {alert["labels"]["alertname"]: alert for alert in run.prometheus.api("alerts")["alerts"]}
    # The tiny test model has random weights: that alert is pending (its `for` is 1 minute).
    assert alerts["CliplensServingRandomWeights"]["state"] in ("pending", "firing")
    assert "CliplensTargetDown" not in alerts


def test_a_picture_of_the_dashboard_renders_from_the_query_results(run: Run, tmp_path: Path) -> None:
    """Not a Grafana screenshot: the dashboard's own PromQL over this run, drawn with matplotlib.

    Set CLIPLENS_DASHBOARD_PNG=docs/observability-dashboard.png to keep the picture.
    """
    destination = Path(os.environ.get("CLIPLENS_DASHBOARD_PNG") or tmp_path / "dashboard.png")
    render_picture(run, destination)
    assert destination.stat().st_size > 10_000


def render_picture(run: Run, destination: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads((ROOT / "grafana" / "dashboards" / "cliplens-stage-latency.json").read_text())
    repeated = next(p for p in panels(dashboard) if p["title"] == "Per request · $stage")
    concurrency = next(p for p in panels(dashboard) if p["title"].startswith("Requests in flight"))
    wait_vs_work = next(p for p in panels(dashboard) if p["title"].startswith("Queue wait vs work"))
    every = {"instance": ".*", "stage": ".*", "work_stage": ".*"}

    def series(
        target: dict[str, Any], variables: dict[str, str], scale: float
    ) -> Iterator[tuple[str, list[float], list[float]]]:
        """Each result series as (legend, seconds into the load, values), with gaps where it had no data."""
        for result in evaluate(run, target, variables):
            legend = target["legendFormat"]
            for name, value in result["metric"].items():
                legend = legend.replace("{{" + name + "}}", value)
            times: list[float] = []
            values: list[float] = []
            for t, v in result["values"]:
                if times and float(t) - run.start - times[-1] > 1.5 * SCRAPE_S:
                    times.append(times[-1] + SCRAPE_S)
                    values.append(math.nan)
                times.append(float(t) - run.start)
                values.append(float(v) * scale)
            yield legend, times, values

    figure, axes = plt.subplots(3, 2, figsize=(12, 9), sharex=True)
    flat = axes.flatten()
    for legend, times, values in series(concurrency["targets"][0], every, 1):
        flat[0].step(times, values, where="post", label=legend)
    flat[0].set_title("Requests in flight (sampled at each scrape)")
    for ax, stage in zip(flat[1:5], STAGES, strict=True):
        for target in repeated["targets"]:
            for legend, times, values in series(target, {**every, "stage": stage}, 1e3):
                style = "--" if legend.endswith(("min", "max")) else "-"
                ax.plot(times, values, style, label=legend.removeprefix(f"{stage} "), linewidth=1.2)
        ax.set_title(f"Per request · {stage} (ms)")
    for target in wait_vs_work["targets"]:
        for legend, times, values in series(target, every, 1e3):
            flat[5].plot(times, values, "--" if legend.endswith("wait") else "-", label=legend, linewidth=1.2)
    flat[5].set_title("Queue wait vs work, mean per image (ms)")
    for ax in flat:
        ax.legend(fontsize=6, loc="upper left", ncol=3)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("seconds into the test load")
    figure.suptitle(
        "cliplens — stage latency: the dashboard's PromQL evaluated by a real Prometheus over a test load\n"
        f"(tiny CLIP, 2 CPU cores, closed-loop concurrency {', '.join(map(str, LEVELS))}, "
        f"{REQUESTS_PER_WORKER} requests per client; drawn with matplotlib, not a Grafana screenshot)",
        fontsize=9,
    )
    figure.tight_layout()
    destination.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(destination, dpi=72)
    plt.close(figure)
