"""The benchmark's reading of `py-spy record --gil --threads --format raw` (benchmarks/pipeline.py)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "cliplens_bench_pipeline", ROOT / "benchmarks" / "pipeline.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


RAW = """\
thread (4101): MainThread;run (asyncio/base_events.py:600);_embed_one (cliplens/pipeline/service.py:640) 30
thread (4101): MainThread;run (asyncio/base_events.py:600);encode_json (litestar/serialization.py:120) 10
thread (4120): cliplens-cpu_0;_decode_and_preprocess (cliplens/pipeline/service.py:548) 25
thread (4121): cliplens-cpu_1;_decode_and_preprocess (cliplens/pipeline/service.py:548) 15
thread (4130): cliplens-model_0;_forward_images (cliplens/pipeline/batcher.py:170) 5
thread (4140): cliplens-io_3;load (cliplens/pipeline/sources.py:140) 4
thread (4150): OtelBatchSpanProcessor;export (opentelemetry/sdk/trace/export/__init__.py:300) 1
py-spy> Stopped sampling because Control-C pressed 7
"""


def test_each_thread_groups_samples_become_seconds_held(bench: ModuleType) -> None:
    held = bench.gil_seconds(RAW, rate=50)
    assert held == pytest.approx(
        {"event loop": 0.8, "decode + preprocess": 0.8, "model": 0.1, "file reads": 0.08, "other": 0.02}
    )


def test_no_samples_is_nothing_held(bench: ModuleType) -> None:
    assert bench.gil_seconds("", rate=50) == {}


def test_the_page_states_the_one_process_ceiling(bench: ModuleType) -> None:
    result = bench.ScenarioResult("cliplens-free", "50 x 30, 2 MP only", 1500, 7.5, 1, 1, {}, {}, 0)
    result.gil_ms = {"event loop": 0.4, "decode + preprocess": 0.6, bench.SAMPLER_CORES: 0.03}
    missing = bench.ScenarioResult("cliplens-free", "50 x 30, 12 MP only", 1500, 30, 1, 1, {}, {}, 0)
    missing.gil_ms = "py-spy is not installed"
    lines = bench.gil_by_thread([result, missing])
    (row,) = [line for line in lines if line.startswith("| 50 x 30, 2 MP only |")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "0.40" and cells[2] == "0.60"
    assert cells[-3:] == ["1.00", "1000", "0.03"]  # total ms, 1000 / total images/s, py-spy's cores
    assert "| 50 x 30, 12 MP only | not measured: py-spy is not installed |" in lines


def test_the_host_limit_is_taken_around_the_load_and_says_how_far_it_moved(bench: ModuleType) -> None:
    """The limit is the mean of the decode costs timed before and after the load, from the fastest
    path that keeps the fidelity bound; `moved` is the limit's change (+: faster after)."""
    before = {"ours": (0.010, True), "pillow": (0.012, True), "too coarse": (0.004, False)}
    after = {"ours": (0.0125, True), "pillow": (0.012, True), "too coarse": (0.005, False)}
    measured = bench.Bracketed(before, after)
    assert measured.mean["ours"] == (pytest.approx(0.01125), True)
    limit, path = bench.host_limit(measured.mean, 2)
    assert path == "ours" and limit == pytest.approx(2 / 0.01125)
    assert measured.moved == pytest.approx(0.010 / 0.0125 - 1)  # the machine slowed by a fifth
    assert bench.Bracketed(after, before).moved == pytest.approx(0.25)


def test_what_bounded_a_run_is_read_from_its_own_numbers(bench: ModuleType) -> None:
    """The model when its worker was in a forward pass 85% of the run or more, else the host CPU
    when at most 10% of the machine's cores were idle, else nothing saturated."""

    def run(model_busy: float | None, idle_cores: float | None) -> object:
        return bench.ScenarioResult(
            "cliplens-default", "50 x 30", 1500, 10.0, 1.0, 2.0, {}, {}, 0,
            model_busy=model_busy, idle_cores=idle_cores,
        )  # fmt: skip

    assert bench.bound_by(run(0.97, 0.0), "cpu", 2) == "the model (CPU)"
    assert bench.bound_by(run(0.85, 1.5), "cuda", 16) == "the model (GPU)"
    assert bench.bound_by(run(0.40, 0.2), "cpu", 2) == "host CPU"
    assert bench.bound_by(run(None, 0.1), "cpu", 2) == "host CPU"  # the original says nothing of its model
    assert bench.bound_by(run(0.40, 0.5), "cpu", 2) == "none saturated"
    assert bench.bound_by(run(0.40, None), "cpu", 2) == "none saturated"  # no /proc/stat
    lines = bench.bounds_section([run(0.97, 0.0)], "cpu")
    assert lines[-1].startswith("| 50 x 30 | cliplens-default | 150.0 | 97% |")
    assert lines[-1].endswith("| 0.00 | the model (CPU) |")
