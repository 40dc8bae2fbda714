"""The Grafana dashboards' queries evaluated by a real Prometheus after a test load, and the checks
that Prometheus agrees with what the load client saw (tests/harness/stage_load.py).

Grafana's variables are substituted as Grafana would (All, each stage, one instance); per level
and per stage, the exact min and max and the mean that Prometheus reports must equal the ones
computed from the `Server-Timing` headers (per request) and the `timings` bodies (per image), to
the rounding of those numbers. The checks take a `Run`, so the single-service test and the
three-replica test hold their own Prometheus to the same contract.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cliplens.telemetry.metrics import LATENCY_BUCKETS
from cliplens.vocabulary import IMAGE_WORK_STAGES, Stage
from tests.harness.prometheus import OBSERVABILITY, ROOT, SCRAPE_S, PrometheusServer
from tests.harness.stage_load import Level, Run

DASHBOARDS = sorted((ROOT / "grafana" / "dashboards").glob("*.json"))
STAGE_LATENCY = ROOT / "grafana" / "dashboards" / "cliplens-stage-latency.json"
HEADER_TOLERANCE_S = 0.05e-3 + 1e-9
"""Server-Timing durations are rounded to 0.1 ms."""
BODY_TOLERANCE_S = 0.0005e-3 + 1e-9
"""Per-image `timings` are rounded to 0.001 ms."""
RATE_INTERVAL = f"{max(2 * SCRAPE_S, 4 * SCRAPE_S)}s"
"""Grafana's $__rate_interval: max($__interval + scrape interval, 4 x scrape interval), step 1 s."""
EVERY = {"instance": ".*", "stage": ".*", "work_stage": ".*", "gpu": ".*"}
"""Grafana's variables set to All."""
GPU_SERIES = "cliplens_gpu_"
"""The GPU row's series exist only on a CUDA host; the test load runs on the CPU."""


# ---- the dashboards' queries ------------------------------------------------------------------


def has_data_here(target: dict[str, Any]) -> bool:
    """Whether the query can return data after a load on this (GPU-less) machine."""
    return GPU_SERIES not in target["expr"]


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


def range_table(run: Run, dashboard: dict[str, Any], title: str, label: str) -> dict[str, dict[str, float]]:
    """A dashboard "over the selected range" table, evaluated over the whole run: {column: {label: value}}."""
    panel = next(p for p in panels(dashboard) if p["title"] == title)
    organize = next(t for t in panel["transformations"] if t["id"] == "organize")
    columns = {ref.removeprefix("Value #"): name for ref, name in organize["options"]["renameByName"].items()}
    table: dict[str, dict[str, float]] = {}
    for target in panel["targets"]:
        expr = substitute(target["expr"], EVERY, run.end - run.prometheus.started_at)
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


# ---- Prometheus agrees with the load client ---------------------------------------------------


def span(level: Level) -> str:
    return f"{int((level.ended - level.started) * 1000)}ms"


def _delta(prometheus: PrometheusServer, expr: str, level: Level) -> float:
    """A counter's growth over a level: scraped values just before it began and after it ended."""
    return prometheus.value(expr, level.ended) - prometheus.value(expr, level.started)


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


def assert_request_stages_match(prometheus: PrometheusServer, level: Level) -> None:
    """Per request stage, over one level: Prometheus's min, max, count and mean equal Server-Timing's."""
    images = [s for s in level.sent if s.modality == "image"]
    for stage in Stage:
        seen = [s.stages_s[stage] for s in images if stage in s.stages_s]
        assert seen, f"level {level.concurrency}: no {stage} in Server-Timing"
        what = f"level {level.concurrency}, {stage}"
        assert_family_matches(prometheus, "cliplens_request_stage", f'{{stage="{stage}"}}', level, seen, what)


def assert_every_panel_has_data(run: Run, path: Path) -> None:
    """Every query of every panel of the dashboard at `path` returns data, with All selected."""
    dashboard = json.loads(path.read_text())
    empty = [
        f"{title}: {target['expr']}"
        for title, target in targets(dashboard)
        if has_data_here(target) and not has_data(evaluate(run, target, EVERY))
    ]
    assert not empty, "panels without data:\n" + "\n".join(empty)
    assert sum(1 for _ in targets(dashboard)) > 50


def assert_per_image_work_and_wait_match(run: Run) -> None:
    """At every level, the per-image work and queue-wait families equal the response `timings`."""
    prometheus = run.prometheus
    for level in run.levels:
        per_image = [image for s in level.sent for image in s.images]
        for family, key, stages in (
            ("cliplens_image_stage", "work_ms", IMAGE_WORK_STAGES),
            ("cliplens_stage_queue", "queue_ms", tuple(Stage)),
        ):
            for stage in stages:
                seen = [image[stage][key] for image in per_image if stage in image]
                what = f"level {level.concurrency}, {family} {stage}"
                assert_family_matches(
                    prometheus, family, f'{{stage="{stage}"}}', level, seen, what, BODY_TOLERANCE_S
                )


def assert_in_flight_within_levels_and_errors_counted(run: Run) -> None:
    # The in-flight gauge is sampled at scrapes, so it may miss short requests: it can only be
    # held to never exceeding the level's concurrency, and to zero once the load is over. Each
    # replica is held to it on its own: replicas are scraped at different instants, so a sum of
    # their samples can count one client's request on two replicas (it ended on one between the
    # two scrapes, its successor started on the other) and pass the concurrency by chance.
    prometheus = run.prometheus
    for level in run.levels:
        peak = prometheus.value(
            f"max_over_time(max(cliplens_requests_in_flight)[{span(level)}:])", level.ended
        )
        assert peak <= level.concurrency, (peak, level.concurrency)
    assert prometheus.value("sum(cliplens_requests_in_flight)", run.end) == 0
    missing = sum(s.failed for s in run.sent)
    assert missing > 0
    not_found = prometheus.value('sum(cliplens_images_total{outcome="not_found"})', run.end)
    assert not_found == missing


def assert_exemplars_match_the_load(run: Run) -> None:
    """Exemplars carry the trace ids of the load's requests, with the values their headers gave."""
    by_trace = {s.trace_id: s for s in run.sent}
    found = run.prometheus.api(
        "query_exemplars",
        query="cliplens_request_stage_seconds_bucket",
        start=f"{run.start:.3f}",
        end=f"{run.end:.3f}",
    )
    exemplars = [(series["seriesLabels"]["stage"], e) for series in found for e in series["exemplars"]]
    assert len(exemplars) >= len(Stage)
    for stage, exemplar in exemplars:
        sent = by_trace[exemplar["labels"]["trace_id"]]
        assert float(exemplar["value"]) == pytest.approx(sent.stages_s[stage], abs=HEADER_TOLERANCE_S)


def assert_rules_load_and_evaluate(run: Run) -> None:
    """Every recording and alerting rule on disk is loaded and healthy; the expected alerts are up."""
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
