"""The study's table: per scenario and stage, min / max / mean (and p50 / p95 / p99) of the timings.

Every number is computed here from the raw per-request records, nothing else, so a test can
recompute the table from the same records and get the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.table import Table

from cliplens.experiment.load import RequestRecord

REQUEST_STAGES = ("load", "decode", "preprocess", "embed", "total")


@dataclass(frozen=True)
class Stats:
    count: int
    min: float
    max: float
    mean: float
    p50: float
    p95: float
    p99: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Stats | None:
        array = np.asarray(list(values), dtype=np.float64)
        if array.size == 0:
            return None
        p50, p95, p99 = np.percentile(array, [50, 95, 99])
        return cls(
            int(array.size),
            float(array.min()),
            float(array.max()),
            float(array.mean()),
            float(p50),
            float(p95),
            float(p99),
        )

    def short(self) -> str:
        if self.count == 1 or self.min == self.max:
            return _ms(self.mean)
        return f"{_ms(self.min)} / {_ms(self.max)} / {_ms(self.mean)}"


def _ms(value: float) -> str:
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.2f} ms"


def request_stage_stats(records: Sequence[RequestRecord]) -> dict[str, Stats]:
    """Per-request stage windows (Server-Timing) of successful requests, in milliseconds."""
    stats: dict[str, Stats] = {}
    ok = [r for r in records if r.status == 200]
    for stage in REQUEST_STAGES:
        value = Stats.of(r.stages_ms[stage] for r in ok if stage in r.stages_ms)
        if value is not None:
            stats[stage] = value
    return stats


def render_request_table(results: Mapping[str, Sequence[RequestRecord]], console: Console) -> None:
    """One row per scenario; each stage cell is min / max / mean per request (one value if equal)."""
    table = Table(title="cliplens: per-request stage time (min / max / mean)")
    table.add_column("scenario")
    for stage in REQUEST_STAGES:
        table.add_column(stage, justify="right")
    table.add_column("images/s", justify="right")
    table.add_column("errors", justify="right")
    for name, records in results.items():
        stats = request_stage_stats(records)
        wall_s = max((r.latency_ms for r in records), default=0.0) / 1000
        images = sum(r.ok for r in records)
        errors = sum(sum(r.errors.values()) for r in records)
        cells = [stats[s].short() if s in stats else "-" for s in REQUEST_STAGES]
        table.add_row(name, *cells, f"{images / wall_s:.1f}" if wall_s else "-", str(errors))
    console.print(table)
