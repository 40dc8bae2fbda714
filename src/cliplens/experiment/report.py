"""The study's table: per scenario and stage, min / max / mean (and p50 / p95 / p99) of the timings,
and everything else `cliplens experiment` and `cliplens demo` print about a run or a comparison.

Every number is computed here from the raw per-request records, nothing else, with plain
arithmetic a reader can redo by hand (or a test can redo in a few lines):

- per image, each stage's time is the image's wait plus its work in that stage (`queue_ms +
  work_ms` of the service's per-image timings); `load+decode` is the sum over both stages, the
  time from asking for the photo to having its pixels (the stages follow each other without a
  gap: the coroutine that ends the load enters the decode);
- per request, each stage is the `Server-Timing` window (first image in to last image out);
  `load+decode` is the longest per-image `load+decode` of the request, i.e. the time until the
  request's last image was decoded, since all of a request's images enter `load` at its start;
- min and max are the extremes, mean is the (exactly rounded) sum over the count, and pNN is the linear
  interpolation between closest ranks (numpy's `method="linear"`, its default, which is
  `statistics.quantiles(method="inclusive")`);
- throughput is the images returned over the scenario's wall time, first request sent to last
  response received, on the client's clock.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.table import Table
from rich.text import Text

from cliplens.experiment.load import RequestRecord, Scenario
from cliplens.vocabulary import PIPELINE_STAGES, Stage

if TYPE_CHECKING:
    from cliplens.experiment.results import Results
    from cliplens.experiment.study import StudyPlan

IMAGE_STAGES: tuple[Stage, ...] = PIPELINE_STAGES
"""The service's stages that make a vector, in the order an image goes through them (the study's
load skips the embedding cache)."""
LOAD_DECODE = "load+decode"
"""From asking for the photo to having its pixels: the two stages the study did not split out."""
TOTAL = "total"
"""The request's whole window in the service (Server-Timing `total`)."""


def _columns() -> tuple[str, ...]:
    """Every stage, `load+decode` right after the two stages it sums, then `total`."""
    columns: list[str] = []
    for stage in IMAGE_STAGES:
        columns.append(stage)
        if stage is Stage.DECODE:
            columns.append(LOAD_DECODE)
    return (*columns, TOTAL)


COLUMNS = _columns()
"""The table's stage columns: the study's, plus the per-stage windows it did not split out."""
REQUEST_SERIES = (*COLUMNS, "latency")
"""Per-request series: the Server-Timing windows, load+decode, and the client's own latency."""
MEASURES = ("time", "wait", "work")
"""Per-image measures of one stage: wait + work, the wait for a worker, the work itself."""


@dataclass(frozen=True)
class Stats:
    """Count, extremes, mean and percentiles of one series, in milliseconds."""

    count: int
    min: float
    max: float
    mean: float
    p50: float
    p95: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Stats | None:
        if not values:
            return None
        ordered = sorted(values)
        p50, p95, p99 = (float(p) for p in np.percentile(ordered, (50, 95, 99), method="linear"))
        return cls(
            count=len(ordered),
            min=ordered[0],
            max=ordered[-1],
            mean=math.fsum(ordered) / len(ordered),
            p50=p50,
            p95=p95,
            p99=p99,
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Stats:
        return cls(**{name: data[name] for name in ("count", "min", "max", "mean", "p50", "p95", "p99")})

    def to_json(self) -> dict[str, float]:
        return asdict(self)


def _time_in(stage: Mapping[str, float]) -> float:
    return stage["queue_ms"] + stage["work_ms"]


def _load_decode(stages: Mapping[str, Mapping[str, float]]) -> float | None:
    """One image's time from asking for the photo to having its pixels, if it got that far."""
    if Stage.LOAD in stages and Stage.DECODE in stages:
        return _time_in(stages[Stage.LOAD]) + _time_in(stages[Stage.DECODE])
    return None


def _answered(records: Sequence[RequestRecord]) -> list[RequestRecord]:
    return [record for record in records if record.status == 200]


def image_series(records: Sequence[RequestRecord]) -> dict[str, dict[str, list[float]]]:
    """{column: {measure: values}} over every image of every answered request."""
    series: dict[str, dict[str, list[float]]] = {
        stage: {measure: [] for measure in MEASURES} for stage in IMAGE_STAGES
    }
    series[LOAD_DECODE] = {"time": []}
    for record in _answered(records):
        for item in record.items:
            for stage in IMAGE_STAGES:
                if stage in item.stages:
                    timing = item.stages[stage]
                    series[stage]["time"].append(_time_in(timing))
                    series[stage]["wait"].append(timing["queue_ms"])
                    series[stage]["work"].append(timing["work_ms"])
            if (chain := _load_decode(item.stages)) is not None:
                series[LOAD_DECODE]["time"].append(chain)
    return series


def request_series(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """{column: values} over the answered requests; see the module docstring for load+decode."""
    series: dict[str, list[float]] = {name: [] for name in REQUEST_SERIES}
    for record in _answered(records):
        for stage in (*IMAGE_STAGES, TOTAL):
            if stage in record.stages_ms:
                series[stage].append(record.stages_ms[stage])
        chains = [chain for item in record.items if (chain := _load_decode(item.stages)) is not None]
        if chains:
            series[LOAD_DECODE].append(max(chains))
        series["latency"].append(record.latency_ms)
    return series


def wall_ms(records: Sequence[RequestRecord]) -> float:
    """The scenario's wall time on the client: first request sent to last response received."""
    if not records:
        return 0.0
    return max(r.done_ms for r in records) - min(r.sent_ms for r in records)


@dataclass(frozen=True)
class ScenarioSummary:
    """Everything the tables print about one scenario, computed from its records only."""

    key: str
    name: str
    images_per_request: int
    concurrency: int
    requests: int
    requests_ok: int
    images: int
    images_ok: int
    errors: dict[str, int]
    wall_ms: float
    images_per_s: float
    per_image: dict[str, dict[str, Stats]]
    per_request: dict[str, Stats]

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "name": self.name,
            "images_per_request": self.images_per_request,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "requests_ok": self.requests_ok,
            "images": self.images,
            "images_ok": self.images_ok,
            "errors": self.errors,
            "error_count": self.error_count,
            "wall_ms": self.wall_ms,
            "images_per_s": self.images_per_s,
            "per_image": {
                column: {measure: stats.to_json() for measure, stats in measures.items()}
                for column, measures in self.per_image.items()
            },
            "per_request": {column: stats.to_json() for column, stats in self.per_request.items()},
        }


def summarize(scenario: Scenario, records: Sequence[RequestRecord]) -> ScenarioSummary:
    """The scenario's summary from its raw records."""
    per_image: dict[str, dict[str, Stats]] = {}
    for column, measures in image_series(records).items():
        computed = {measure: Stats.of(values) for measure, values in measures.items()}
        kept = {measure: stats for measure, stats in computed.items() if stats is not None}
        if kept:
            per_image[column] = kept
    per_request = {
        column: stats
        for column, values in request_series(records).items()
        if (stats := Stats.of(values)) is not None
    }
    errors: dict[str, int] = {}
    for record in records:
        for code, count in record.errors.items():
            errors[code] = errors.get(code, 0) + count
    images_ok = sum(r.ok for r in records)
    wall = wall_ms(records)
    return ScenarioSummary(
        key=scenario.key,
        name=scenario.name,
        images_per_request=scenario.images,
        concurrency=scenario.concurrency,
        requests=len(records),
        requests_ok=len(_answered(records)),
        images=sum(r.images for r in records),
        images_ok=images_ok,
        errors=dict(sorted(errors.items())),
        wall_ms=wall,
        images_per_s=images_ok / (wall / 1e3) if wall > 0 else 0.0,
        per_image=per_image,
        per_request=per_request,
    )


def format_ms(value: float) -> str:
    """Milliseconds at a precision that fits a column: 8870, 546.5 -> 546, 12.79 -> 12.8, 1.52."""
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def format_cell(stats: Stats | None, fields: tuple[str, str, str]) -> str:
    """`min / max / mean` (or the fields asked for); a single value when there is one observation."""
    if stats is None:
        return "-"
    if stats.count == 1:
        return format_ms(stats.mean)
    return " / ".join(format_ms(getattr(stats, name)) for name in fields)


def _errors_cell(summary: ScenarioSummary) -> str:
    if not summary.errors:
        return "0"
    details = ", ".join(f"{code} {count}" for code, count in summary.errors.items())
    return f"{summary.error_count} ({details})"


def _stage_table(
    summaries: Sequence[ScenarioSummary], title: str, fields: tuple[str, str, str], caption: str | None
) -> Table:
    table = Table(title=title, caption=caption, caption_justify="left")
    table.add_column("scenario")
    table.add_column("scope")
    for column in COLUMNS:
        table.add_column(column, justify="right")
    table.add_column("images/s", justify="right")
    table.add_column("errors", justify="right")
    for summary in summaries:
        images = summary.per_image
        image_cells = [
            format_cell(images[c]["time"] if c in images else None, fields) if c != TOTAL else "-"
            for c in COLUMNS
        ]
        request_cells = [format_cell(summary.per_request.get(c), fields) for c in COLUMNS]
        table.add_row(
            summary.name,
            f"per image ({summary.images_ok})",
            *image_cells,
            f"{summary.images_per_s:.1f}",
            _errors_cell(summary),
        )
        table.add_row("", f"per request ({summary.requests_ok})", *request_cells, "", "", end_section=True)
    return table


SCOPES_CAPTION = (
    "per image: time in the stage, wait + work (the service's per-image timings); "
    "per request: Server-Timing window, first image in to last out; load+decode per request: "
    "until its last image was decoded. images/s: images returned / wall time of the scenario."
)


def render_tables(summaries: Sequence[ScenarioSummary], console: Console) -> None:
    """The study's table (min / max / mean), the same in percentiles, and where the time goes."""
    console.print(
        _stage_table(summaries, "time per stage (ms): min / max / mean", ("min", "max", "mean"), None)
    )
    console.print(
        _stage_table(summaries, "time per stage (ms): p50 / p95 / p99", ("p50", "p95", "p99"), SCOPES_CAPTION)
    )
    split = Table(title="per image (ms): mean wait / mean work in each stage")
    split.add_column("scenario")
    for stage in IMAGE_STAGES:
        split.add_column(stage, justify="right")
    for summary in summaries:
        cells = []
        for stage in IMAGE_STAGES:
            measures = summary.per_image.get(stage, {})
            if "wait" in measures and "work" in measures:
                cells.append(f"{format_ms(measures['wait'].mean)} / {format_ms(measures['work'].mean)}")
            else:
                cells.append("-")
        split.add_row(summary.name, *cells)
    console.print(split)


def _ratio(a: float | None, b: float | None, lower_is_better: bool = True) -> Text:
    if a is None or b is None or a <= 0:
        return Text("-")
    ratio = b / a
    better = ratio < 1 if lower_is_better else ratio > 1
    style = "" if abs(ratio - 1) < 0.05 else ("green" if better else "red")
    return Text(f"x{ratio:.2f}", style=style)


def _mean(stats: Stats | None) -> float | None:
    return None if stats is None else stats.mean


def _p95(stats: Stats | None) -> float | None:
    return None if stats is None else stats.p95


def _ms_or_dash(value: float | None) -> str:
    return "-" if value is None else format_ms(value)


def render_comparison(
    a: Sequence[ScenarioSummary],
    b: Sequence[ScenarioSummary],
    console: Console,
    labels: tuple[str, str] = ("A", "B"),
) -> None:
    """Two runs side by side, per scenario in both, per stage: mean and p95 of A and B, and B / A."""
    by_key = {summary.key: summary for summary in b}
    table = Table(
        title=f"{labels[0]} -> {labels[1]}: mean and p95 per stage (ms), ratio {labels[1]} / {labels[0]}"
    )
    table.add_column("scenario")
    table.add_column("scope / stage")
    for head in (
        f"{labels[0]} mean",
        f"{labels[1]} mean",
        "ratio",
        f"{labels[0]} p95",
        f"{labels[1]} p95",
        "ratio",
    ):
        table.add_column(head, justify="right")
    for left in a:
        right = by_key.get(left.key)
        if right is None:
            continue
        rows: list[tuple[str, Stats | None, Stats | None]] = []
        for column in COLUMNS:
            if column != TOTAL:
                rows.append(
                    (
                        f"per image {column}",
                        left.per_image.get(column, {}).get("time"),
                        right.per_image.get(column, {}).get("time"),
                    )
                )
        for column in COLUMNS:
            rows.append(
                (f"per request {column}", left.per_request.get(column), right.per_request.get(column))
            )
        for index, (label, x, y) in enumerate(rows):
            table.add_row(
                left.name if index == 0 else "",
                label,
                _ms_or_dash(_mean(x)),
                _ms_or_dash(_mean(y)),
                _ratio(_mean(x), _mean(y)),
                _ms_or_dash(_p95(x)),
                _ms_or_dash(_p95(y)),
                _ratio(_p95(x), _p95(y)),
            )
        table.add_row(
            "",
            "images/s",
            f"{left.images_per_s:.1f}",
            f"{right.images_per_s:.1f}",
            _ratio(left.images_per_s, right.images_per_s, lower_is_better=False),
            "",
            "",
            "",
        )
        table.add_row(
            "", "errors", str(left.error_count), str(right.error_count), "", "", "", "", end_section=True
        )
    console.print(table)
    only_a = [s.name for s in a if s.key not in by_key]
    only_b = [s.name for s in b if s.key not in {x.key for x in a}]
    if only_a:
        console.print(f"only in {labels[0]}: {', '.join(only_a)}")
    if only_b:
        console.print(f"only in {labels[1]}: {', '.join(only_b)}")


# --- what the commands print around the tables ----------------------------------------------------


def make_console() -> Console:
    """The commands' console: the terminal's width, or 200 columns when piped so tables do not wrap."""
    return Console(width=None if sys.stdout.isatty() else 200)


def render_plan(title: str, plan: StudyPlan, console: Console) -> None:
    """The run about to start, in one line: so a long run says at once what it is measuring."""
    console.print(
        f"[bold]{title}[/bold]: scenarios {', '.join(s.key for s in plan.scenarios)}"
        + (f", {plan.repeat} rounds each" if plan.repeat > 1 else "")
        + f"; service {plan.url or 'in-process'}, storage {plan.storage}, output in {plan.out_dir}"
    )


def render_failure(title: str, error: Exception, console: Console) -> None:
    """Why the command stopped; the errors it catches carry a message that says what to change."""
    console.print(f"[red]{title} failed:[/red] {error}")


def _render_context(results: Results, console: Console) -> None:
    """What the numbers were measured on: model, service, photos, storage, machine."""
    model: dict[str, Any] = results.service.get("model", {})
    if model.get("random_weights"):
        console.print("[yellow]RANDOM WEIGHTS: timings are real, vectors are meaningless[/yellow]")
    storage = results.storage
    injected = ""
    if storage.get("delay_ms") or storage.get("rate_mbps"):
        rate = storage.get("rate_mbps")
        injected = f" (+{storage.get('delay_ms', 0):g} ms per object, " + (
            f"{rate:g} Mbit/s per connection)" if rate else "no rate limit)"
        )
    corpus = results.corpus
    console.print(
        f"model {model.get('id')} on {model.get('device')} ({model.get('dtype')}), "
        f"dimension {model.get('dimension')}; service {results.service.get('url')}"
        + (" (in-process)" if results.service.get("in_process") else "")
    )
    megapixels = corpus.get("mean_megapixels", 0)  # None: a bucket's photos, whose pixels were not read
    console.print(
        f"photos: {corpus.get('count')} ({corpus.get('source')}, "
        + (f"{megapixels:.1f} MP and " if megapixels is not None else "")
        + f"{corpus.get('mean_bytes', 0) / 1e6:.2f} MB on average) from storage "
        f"{storage.get('kind')}{injected}" + (" (in place)" if storage.get("in_place") else "")
    )
    console.print(
        f"machine: {results.machine.get('cpu')}, {results.machine.get('cores_usable')} cores usable, "
        f"{len(results.machine.get('gpus', []))} GPU"
    )


def _render_slowest(results: Results, console: Console) -> None:
    """The slowest request, with its trace id: the one to open in Jaeger first."""
    answered = [(run.scenario, r) for run in results.runs for r in run.records if r.status == 200]
    if not answered:
        return
    scenario, record = max(answered, key=lambda pair: pair[1].stages_ms.get(TOTAL, pair[1].latency_ms))
    console.print(
        f"slowest request: {scenario.name}, {record.stages_ms.get(TOTAL, record.latency_ms):.0f} ms "
        f"in the service, trace id {record.trace_id}"
    )


def render_run(results: Results, console: Console) -> None:
    """A finished run: its context, the study's tables, and the slowest request's trace id."""
    _render_context(results, console)
    render_tables(results.summaries(), console)
    _render_slowest(results, console)


def render_file(what: str, path: Path, console: Console) -> None:
    """Where a run's file was written (`results: ...`, `figure: ...`)."""
    console.print(f"{what}: {path}")


def render_errors(results: Results, json_path: Path, console: Console) -> None:
    """A closing warning when images failed, since the table's errors column is easy to miss."""
    errors = sum(summary.error_count for summary in results.summaries())
    if errors:
        console.print(f"[yellow]{errors} images failed: see the errors column and {json_path}[/yellow]")


_LOOPBACK_PORT = re.compile(r"(127\.0\.0\.1|localhost|\[::1\]):\d+")


def _shown(value: object) -> str:
    """A value as the differences table shows it; loopback ports are drawn afresh each run."""
    return _LOOPBACK_PORT.sub(r"\1:*", str(value))


def differences(a: Results, b: Results) -> list[tuple[str, str, str]]:
    """What changed between two runs: settings, model, storage, machine."""
    rows: list[tuple[str, str, str]] = []

    def compare(prefix: str, left: dict[str, Any] | None, right: dict[str, Any] | None) -> None:
        left, right = left or {}, right or {}
        for key in sorted(set(left) | set(right)):
            if isinstance(left.get(key), dict) or isinstance(right.get(key), dict):
                continue
            shown = _shown(left.get(key, "-")), _shown(right.get(key, "-"))
            if shown[0] != shown[1]:
                rows.append((f"{prefix}{key}", *shown))

    compare("settings.", a.service.get("settings"), b.service.get("settings"))
    compare("model.", a.service.get("model"), b.service.get("model"))
    compare("storage.", a.storage, b.storage)
    for key in ("cpu", "cores_usable", "gpus"):
        if a.machine.get(key) != b.machine.get(key):
            rows.append((f"machine.{key}", str(a.machine.get(key)), str(b.machine.get(key))))
    return rows


def render_pair(a: Results, b: Results, paths: tuple[str, str], console: Console) -> None:
    """`--compare A.json B.json`: which is which, what differs between them, and the ratio table."""
    labels = (a.label, b.label) if a.label != b.label else (Path(paths[0]).stem, Path(paths[1]).stem)
    if labels[0] == labels[1]:
        labels = ("A", "B")
    console.print(f"[bold]{labels[0]}[/bold] = {paths[0]}, [bold]{labels[1]}[/bold] = {paths[1]}")
    rows = differences(a, b)
    if rows:
        table = Table(title="what differs")
        table.add_column("")
        table.add_column(labels[0])
        table.add_column(labels[1])
        for row in rows:
            table.add_row(*row)
        console.print(table)
    render_comparison(a.summaries(), b.summaries(), console, labels)
