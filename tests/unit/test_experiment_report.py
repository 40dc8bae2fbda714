"""The experiment's arithmetic on hand-made records: every expected number is worked out by hand."""

from __future__ import annotations

import json
import random
import statistics

import pytest
from rich.console import Console

from cliplens.experiment.load import ItemTiming, RequestRecord, Scenario, batches, parse_server_timing
from cliplens.experiment.report import (
    Stats,
    format_cell,
    format_ms,
    render_comparison,
    render_tables,
    summarize,
)
from cliplens.experiment.results import Results, ScenarioRun
from cliplens.vocabulary import Stage


def _item(index: int, load: tuple[float, float], decode: tuple[float, float]) -> ItemTiming:
    stages: dict[str, dict[str, float]] = {
        Stage.LOAD: {"queue_ms": load[0], "work_ms": load[1]},
        Stage.DECODE: {"queue_ms": decode[0], "work_ms": decode[1]},
        Stage.PREPROCESS: {"queue_ms": 0.5, "work_ms": 2.0},
        Stage.EMBED: {"queue_ms": 1.0, "work_ms": 10.0},
    }
    return ItemTiming(index, stages)


def _records() -> list[RequestRecord]:
    """Two concurrent requests of two images; one image of the second failed to load."""
    first = RequestRecord(
        scenario="2x2",
        images=2,
        status=200,
        latency_ms=60.0,
        stages_ms={
            Stage.LOAD: 30.0,
            Stage.DECODE: 25.0,
            Stage.PREPROCESS: 5.0,
            Stage.EMBED: 12.0,
            "total": 55.0,
        },
        ok=2,
        sent_ms=0.0,
        done_ms=60.0,
        items=[_item(0, (0.0, 20.0), (1.0, 4.0)), _item(1, (10.0, 20.0), (0.0, 5.0))],
    )
    second = RequestRecord(
        scenario="2x2",
        images=2,
        status=200,
        latency_ms=95.0,
        stages_ms={
            Stage.LOAD: 40.0,
            Stage.DECODE: 6.0,
            Stage.PREPROCESS: 3.0,
            Stage.EMBED: 11.0,
            "total": 90.0,
        },
        ok=1,
        errors={"not_found": 1},
        sent_ms=5.0,
        done_ms=100.0,
        items=[
            _item(0, (2.0, 38.0), (0.0, 6.0)),
            ItemTiming(1, {Stage.LOAD: {"queue_ms": 0.0, "work_ms": 1.0}}),
        ],
    )
    refused = RequestRecord(scenario="2x2", images=2, status=429, latency_ms=1.0, errors={"http_429": 2})
    refused.sent_ms, refused.done_ms = 1.0, 2.0
    return [first, second, refused]


def test_summary_is_the_arithmetic_of_the_records() -> None:
    summary = summarize(Scenario(2, 2), _records())
    load = summary.per_image[Stage.LOAD]["time"]
    assert (load.count, load.min, load.max) == (4, 1.0, 40.0)
    assert load.mean == pytest.approx((20 + 30 + 40 + 1) / 4)
    assert summary.per_image[Stage.LOAD]["wait"].max == 10.0
    assert summary.per_image[Stage.DECODE]["time"].count == 3
    assert summary.per_image["load+decode"]["time"].max == 46.0
    per_request = summary.per_request
    assert per_request["load+decode"].count == 2
    assert (per_request["load+decode"].min, per_request["load+decode"].max) == (35.0, 46.0)
    assert per_request["total"].mean == pytest.approx(72.5)
    assert per_request["latency"].count == 2
    assert (summary.requests, summary.requests_ok, summary.images, summary.images_ok) == (3, 2, 6, 3)
    assert summary.errors == {"http_429": 2, "not_found": 1} and summary.error_count == 3
    assert summary.wall_ms == 100.0
    assert summary.images_per_s == pytest.approx(30.0)


def test_percentiles_interpolate_linearly_between_closest_ranks() -> None:
    # By hand: p95 of 1..4 lies at rank (4 - 1) * 0.95 = 2.85, i.e. 3 + 0.85 * (4 - 3).
    stats = Stats.of([4.0, 1.0, 3.0, 2.0])
    assert stats is not None
    assert (stats.p50, stats.p95, stats.p99) == pytest.approx((2.5, 3.85, 3.97))
    rng = random.Random(3)
    for size in (1, 2, 3, 10, 101):
        values = [rng.uniform(0, 1000) for _ in range(size)]
        stats = Stats.of(values)
        assert stats is not None
        # The standard library's inclusive quantiles are the same definition, computed independently.
        cuts = statistics.quantiles(values, n=100, method="inclusive") if size > 1 else [values[0]] * 99
        assert (stats.p50, stats.p95, stats.p99) == pytest.approx((cuts[49], cuts[94], cuts[98]))
    assert Stats.of([]) is None


def test_cells_show_one_value_for_one_observation_and_three_otherwise() -> None:
    assert [format_ms(v) for v in (8870.0, 546.46, 12.79, 1.5)] == ["8870", "546", "12.8", "1.50"]
    assert format_cell(Stats.of([76.68]), ("min", "max", "mean")) == "76.7"
    assert format_cell(Stats.of([1.0, 3.0]), ("min", "max", "mean")) == "1.00 / 3.00 / 2.00"
    assert format_cell(None, ("min", "max", "mean")) == "-"


def test_tables_and_comparison_render_every_scenario() -> None:
    fast = [summarize(Scenario(2, 2), _records())]
    slow_records = _records()
    for record in slow_records:
        record.stages_ms = {k: v * 2 for k, v in record.stages_ms.items()}
    slow = [summarize(Scenario(2, 2), slow_records)]
    console = Console(record=True, width=220)
    render_tables(fast, console)
    render_comparison(fast, slow, console, ("before", "after"))
    text = console.export_text()
    assert "2 images x 2 concurrent" in text
    assert "per image (3)" in text and "per request (2)" in text
    assert "3 (http_429 2, not_found 1)" in text
    total_row = next(line for line in text.splitlines() if "per request total" in line)
    assert "x2.00" in total_row


def test_results_survive_a_round_trip_through_json() -> None:
    results = Results(runs=[ScenarioRun(Scenario(2, 2), _records())], label="r", machine={"cpu": "x"})
    again = Results.from_json(json.loads(json.dumps(results.to_json())))
    assert again.summaries() == results.summaries()
    assert again.runs[0].records == results.runs[0].records
    with pytest.raises(ValueError, match="schema"):
        Results.from_json({"schema": "something else"})


def test_scenarios_parse_name_and_spread_photos() -> None:
    assert Scenario.parse("50x30") == Scenario(50, 30)
    assert Scenario.parse(" 100 ") == Scenario(100, 1)
    assert Scenario(50, 30).name == "50 images x 30 concurrent"
    assert Scenario(1, 8).name == "1 image x 8 concurrent"
    for bad in ("0", "5x0", "x3", "a"):
        with pytest.raises(ValueError):
            Scenario.parse(bad)
    waves = list(batches(Scenario(2, 3), ["a", "b", "c", "d"], rounds=2))
    assert waves == [[["a", "b"], ["c", "d"], ["a", "b"]], [["c", "d"], ["a", "b"], ["c", "d"]]]
    assert parse_server_timing("load;dur=1.5, decode;dur=2, total;dur=4.25") == {
        Stage.LOAD: 1.5,
        Stage.DECODE: 2.0,
        "total": 4.25,
    }
