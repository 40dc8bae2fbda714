"""The figure of a run: what a person would rather look at than the table.

Four panels, all from the raw records (the same series as the table):

1. per image, the distribution of each stage's time (wait + work) per scenario, log scale;
2. per request, the distribution of each stage's window (Server-Timing) per scenario, log scale;
3. growth: the mean and p95 per image of each stage, from the lightest scenario to the one with
   the most images in flight, so the stage that grows under concurrency stands out;
4. where the time goes: per scenario and stage, the mean wait stacked on the mean work.

It draws on a bare `Figure` with the Agg canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cliplens.experiment.report import COLUMNS, IMAGE_STAGES, Stats, image_series, request_series
from cliplens.experiment.results import Results, ScenarioRun

_FLOOR_MS = 0.01
"""Log axes cannot show 0 ms; anything below is drawn at this floor."""
_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


def _floor(values: Sequence[float]) -> list[float]:
    return [max(value, _FLOOR_MS) for value in values] or [_FLOOR_MS]


def _grouped_boxes(
    axes: Axes, groups: Sequence[str], runs: Sequence[ScenarioRun], series: list[dict[str, list[float]]]
) -> None:
    width = 0.8 / max(len(runs), 1)
    for index, run in enumerate(runs):
        positions = [g + (index - (len(runs) - 1) / 2) * width for g in range(len(groups))]
        data = [_floor(series[index].get(group, [])) for group in groups]
        boxes = axes.boxplot(
            data,
            positions=positions,
            widths=width * 0.85,
            patch_artist=True,
            showfliers=True,
            flierprops={"markersize": 2, "alpha": 0.4},
            medianprops={"color": "black"},
            manage_ticks=False,
        )
        colour = _COLOURS[index % len(_COLOURS)]
        for box in boxes["boxes"]:
            box.set_facecolor(colour)
            box.set_alpha(0.8)
        axes.plot([], [], color=colour, linewidth=6, label=run.scenario.name)
    axes.set_xticks(range(len(groups)), groups)
    axes.set_yscale("log")
    axes.set_ylabel("ms (log)")
    axes.grid(axis="y", which="both", alpha=0.3)
    axes.legend(fontsize=7, loc="upper left")


def _growth(axes: Axes, runs: Sequence[ScenarioRun]) -> None:
    ordered = sorted(runs, key=lambda run: (run.scenario.in_flight, run.scenario.concurrency))
    labels = [f"{run.scenario.key}\n{run.summary().images_per_s:.1f} img/s" for run in ordered]
    series = [image_series(run.records) for run in ordered]
    for index, stage in enumerate(IMAGE_STAGES):
        colour = _COLOURS[index % len(_COLOURS)]
        means, p95s = [], []
        for values in series:
            stats = Stats.of(values[stage]["time"])
            means.append(max(stats.mean, _FLOOR_MS) if stats else float("nan"))
            p95s.append(max(stats.p95, _FLOOR_MS) if stats else float("nan"))
        axes.plot(range(len(ordered)), means, marker="o", color=colour, label=f"{stage} mean")
        axes.plot(range(len(ordered)), p95s, linestyle="--", color=colour, alpha=0.7, label=f"{stage} p95")
    axes.set_xticks(range(len(ordered)), labels, fontsize=8)
    axes.set_yscale("log")
    axes.set_ylabel("ms per image (log)")
    axes.set_xlabel("scenario (images per request x concurrent requests), by images in flight")
    axes.grid(axis="y", which="both", alpha=0.3)
    axes.legend(fontsize=7, ncol=2, loc="upper left")


def _split(axes: Axes, runs: Sequence[ScenarioRun]) -> None:
    width = 0.8 / max(len(runs), 1)
    for index, run in enumerate(runs):
        series = image_series(run.records)
        colour = _COLOURS[index % len(_COLOURS)]
        positions = [s + (index - (len(runs) - 1) / 2) * width for s in range(len(IMAGE_STAGES))]
        waits = [(Stats.of(series[s]["wait"]) or Stats(0, 0, 0, 0, 0, 0, 0)).mean for s in IMAGE_STAGES]
        works = [(Stats.of(series[s]["work"]) or Stats(0, 0, 0, 0, 0, 0, 0)).mean for s in IMAGE_STAGES]
        axes.bar(positions, works, width * 0.9, color=colour, label=f"{run.scenario.name}: work")
        axes.bar(
            positions,
            waits,
            width * 0.9,
            bottom=works,
            color=colour,
            alpha=0.35,
            hatch="//",
            label="wait" if index == 0 else None,
        )
    axes.set_xticks(range(len(IMAGE_STAGES)), IMAGE_STAGES)
    axes.set_ylabel("mean ms per image (solid: work, hatched: wait)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=7, loc="upper left")


def draw(results: Results, path: Path) -> Path:
    """Write the run's figure as a PNG at `path`."""
    figure = Figure(figsize=(16, 11), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    (top_left, top_right), (bottom_left, bottom_right) = figure.subplots(2, 2)
    runs = results.runs
    _grouped_boxes(
        top_left,
        IMAGE_STAGES,
        runs,
        [{stage: measures["time"] for stage, measures in image_series(run.records).items()} for run in runs],
    )
    top_left.set_title("per image: time in each stage (wait + work)")
    _grouped_boxes(top_right, COLUMNS, runs, [request_series(run.records) for run in runs])
    top_right.set_title("per request: stage windows (Server-Timing; load+decode to the last decoded image)")
    _growth(bottom_left, runs)
    if runs:
        lightest = min(runs, key=lambda r: r.scenario.in_flight).scenario.name
        heaviest = max(runs, key=lambda r: r.scenario.in_flight).scenario.name
        bottom_left.set_title(f"growth per image: from {lightest} to {heaviest}")
    _split(bottom_right, runs)
    bottom_right.set_title("where the time goes: mean work and wait per image")
    model = results.service.get("model", {})
    machine = results.machine
    storage = results.storage
    figure.suptitle(
        f"cliplens experiment '{results.label}': {model.get('id', '?')} on {model.get('device', '?')} "
        f"({model.get('dtype', '?')}), storage {storage.get('kind', '?')}"
        + (f" +{storage['delay_ms']:.0f} ms" if storage.get("delay_ms") else "")
        + (f" @{storage['rate_mbps']:g} Mbit/s" if storage.get("rate_mbps") else "")
        + f"; {machine.get('cpu', '?')}, {machine.get('cores_usable', '?')} cores",
        fontsize=11,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path
