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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cliplens.experiment.inprocess import InProcessService
from cliplens.settings import Settings
from cliplens.vocabulary import IMAGE_WORK_STAGES, Stage
from tests.conftest import BUCKET, PARTIAL
from tests.harness.dashboards import (
    BODY_TOLERANCE_S,
    DASHBOARDS,
    EVERY,
    HEADER_TOLERANCE_S,
    STAGE_LATENCY,
    assert_every_panel_has_data,
    assert_exemplars_match_the_load,
    assert_family_matches,
    assert_in_flight_within_levels_and_errors_counted,
    assert_per_image_work_and_wait_match,
    assert_request_stages_match,
    assert_rules_load_and_evaluate,
    bucket_bounds,
    evaluate,
    has_data,
    has_data_here,
    panels,
    range_table,
    substitute,
    targets,
)
from tests.harness.prometheus import SCRAPE_S, PrometheusServer
from tests.harness.servers import FakeGcs
from tests.harness.stage_load import EXTREMES_WINDOW_S, LEVELS, REQUESTS_PER_WORKER, Run, drive

pytestmark = pytest.mark.slow  # about a minute: a real Prometheus watching four load levels


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
        on_error=PARTIAL,
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
            levels = asyncio.run(drive(url, prometheus))
            last_scrape = prometheus.value('timestamp(up{job="cliplens"})', time.time())
            yield Run(prometheus, target, levels, start, last_scrape)
        finally:
            prometheus.stop()


# ---- the dashboards ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_every_panel_query_returns_data_for_all_stages_and_instances(run: Run, path: Path) -> None:
    assert_every_panel_has_data(run, path)


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.stem for p in DASHBOARDS])
def test_every_panel_query_returns_data_for_each_stage_and_one_instance(run: Run, path: Path) -> None:
    dashboard = json.loads(path.read_text())
    instance = re.escape(run.target).replace("\\", "\\\\")  # as Grafana escapes a value for PromQL
    empty = []
    for stage in Stage:
        variables = {"instance": instance, "stage": stage, "work_stage": stage, "gpu": ".*"}
        for title, target in targets(dashboard):
            if stage not in IMAGE_WORK_STAGES and "$work_stage" in target["expr"]:
                continue  # `embed` has no per-image work: the work panels are not drawn for it
            if not has_data_here(target):
                continue
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
    assert found.get("work_stage") == set(IMAGE_WORK_STAGES)


# ---- Prometheus agrees with the load client --------------------------------------------------


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


def test_per_image_work_and_wait_extremes_match_the_response_timings_at_every_level(run: Run) -> None:
    assert_per_image_work_and_wait_match(run)


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
    dashboard = json.loads(STAGE_LATENCY.read_text())
    images = [s for s in run.sent if s.modality == "image"]
    per_image = [image for s in run.sent for image in s.images]
    assert_table_matches(
        range_table(run, dashboard, "Per request, over the selected range", "stage"),
        {stage: [s.stages_s[stage] for s in images if stage in s.stages_s] for stage in Stage},
        HEADER_TOLERANCE_S,
    )
    assert_table_matches(
        range_table(run, dashboard, "Whole request, over the selected range", "modality"),
        {m: [s.stages_s["total"] for s in run.sent if s.modality == m] for m in ("image", "text")},
        HEADER_TOLERANCE_S,
    )
    assert_table_matches(
        range_table(run, dashboard, "Per image work, over the selected range", "stage"),
        {
            stage: [image[stage]["work_ms"] for image in per_image if stage in image]
            for stage in IMAGE_WORK_STAGES
        },
        BODY_TOLERANCE_S,
    )
    assert_table_matches(
        range_table(run, dashboard, "Per image queue wait, over the selected range", "stage"),
        {stage: [image[stage]["queue_ms"] for image in per_image if stage in image] for stage in Stage},
        BODY_TOLERANCE_S,
    )


def test_in_flight_stays_within_each_level_and_errors_are_counted_by_code(run: Run) -> None:
    assert_in_flight_within_levels_and_errors_counted(run)


def test_exemplars_carry_the_trace_ids_and_values_of_the_load(run: Run) -> None:
    assert_exemplars_match_the_load(run)


def test_recording_and_alerting_rules_load_and_evaluate(run: Run) -> None:
    assert_rules_load_and_evaluate(run)


def test_a_picture_of_the_dashboard_renders_from_the_query_results(run: Run, tmp_path: Path) -> None:
    """Not a Grafana screenshot: the dashboard's own PromQL over this run, drawn with matplotlib.

    Set CLIPLENS_DASHBOARD_PNG=docs/observability-dashboard.png to keep the picture.
    """
    destination = Path(os.environ.get("CLIPLENS_DASHBOARD_PNG") or tmp_path / "dashboard.png")
    render_picture(run, destination)
    with Image.open(destination) as picture:
        assert picture.format == "PNG"
        assert picture.size == picture_size()
        pixels = np.asarray(picture.convert("RGB"))
    # Drawn, not blank: a white page has one colour; axes, text and a line per series have many.
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 50, f"{len(colours)} colours"
    # Every panel has lines in the plot colours, not only the black and grey of its frame and text.
    coloured = np.ptp(pixels.astype(int), axis=2) > 60
    cell_height, cell_width = pixels.shape[0] // picture_rows(), pixels.shape[1] // 2
    for panel in range(len(Stage) + 2):
        row, column = divmod(panel, 2)
        cell = coloured[
            row * cell_height : (row + 1) * cell_height, column * cell_width : (column + 1) * cell_width
        ]
        assert cell.mean() > 0.001, f"panel {panel} has no coloured line"


def picture_rows() -> int:
    """Requests in flight, one panel per stage, and queue wait vs work: two panels a row."""
    return math.ceil((1 + len(Stage) + 1) / 2)


PICTURE_DPI = 72


def picture_size() -> tuple[int, int]:
    """The picture's size in pixels: 12 x 3-per-row inches at PICTURE_DPI."""
    return 12 * PICTURE_DPI, 3 * picture_rows() * PICTURE_DPI


def render_picture(run: Run, destination: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dashboard = json.loads(STAGE_LATENCY.read_text())
    repeated = next(p for p in panels(dashboard) if p["title"] == "Per request · $stage")
    concurrency = next(p for p in panels(dashboard) if p["title"].startswith("Requests in flight"))
    wait_vs_work = next(p for p in panels(dashboard) if p["title"].startswith("Queue wait vs work"))

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

    width, height = picture_size()
    figure, axes = plt.subplots(
        picture_rows(), 2, figsize=(width / PICTURE_DPI, height / PICTURE_DPI), sharex=True
    )
    flat = axes.flatten()
    for legend, times, values in series(concurrency["targets"][0], EVERY, 1):
        flat[0].step(times, values, where="post", label=legend)
    flat[0].set_title("Requests in flight (sampled at each scrape)")
    stage_axes = flat[1 : 1 + len(Stage)]
    for ax, stage in zip(stage_axes, Stage, strict=True):
        for target in repeated["targets"]:
            for legend, times, values in series(target, {**EVERY, "stage": stage}, 1e3):
                style = "--" if legend.endswith(("min", "max")) else "-"
                ax.plot(times, values, style, label=legend.removeprefix(f"{stage} "), linewidth=1.2)
        ax.set_title(f"Per request · {stage} (ms)")
    wait_axes = flat[1 + len(Stage)]
    for target in wait_vs_work["targets"]:
        for legend, times, values in series(target, EVERY, 1e3):
            wait_axes.plot(
                times, values, "--" if legend.endswith("wait") else "-", label=legend, linewidth=1.2
            )
    wait_axes.set_title("Queue wait vs work, mean per image (ms)")
    for ax in flat[2 + len(Stage) :]:
        ax.set_visible(False)  # an odd number of panels leaves one cell empty
    for ax in flat[: 2 + len(Stage)]:
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
    figure.savefig(destination, dpi=PICTURE_DPI)
    plt.close(figure)
