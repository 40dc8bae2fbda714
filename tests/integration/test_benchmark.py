"""The benchmark runs end to end at a toy size (it proves it works; no timing is asserted)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_benchmark_runs_every_variant_and_writes_its_page(tmp_path: Path) -> None:
    output = tmp_path / "PERFORMANCE.md"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "pipeline.py"),
            "--tiny",
            "--output",
            str(output),
            "--workdir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    page = output.read_text()
    for variant in (
        "original",
        "cliplens-default",
        "cliplens-float32",
        "cliplens-onnx",
        "cliplens-onnx-int8",
    ):
        assert page.count(f"| {variant} |") == 12, variant  # 4 scenarios, three tables
    for runtime in ("torch float32", "onnxruntime float32", "onnxruntime int8"):
        found = re.search(
            rf"^\| {runtime}[^|]* \| ([0-9.]+) \(batch \d\) \| [0-9.]+x \| ([0-9.]+) / ([0-9.]+) \|",
            page,
            re.M,
        )
        assert found is not None and float(found[1]) > 0 and 0.99 <= float(found[2]) <= float(found[3]), (
            runtime,
            page,
        )
    assert re.search(r"`CLIPLENS_RUNTIME=auto` .* serves (torch|onnxruntime) \w+ on this machine", page)
    assert "- onnxruntime int8, model-only: " in page and "- cliplens-onnx-int8 at 2 x 2, 2 MP only: " in page
    assert page.count("| cliplens-free |") == 3  # its one scenario (2 MP only at --tiny), three tables
    for variant in ("cliplens-cache", "cliplens-cache-off"):  # the 80%-repeated load, three tables
        assert page.count(f"| 2 x 2, 80% repeated photos | {variant} |") == 3, variant
    # what bounded each run: the model's busy share (none for the original), the CPUs, a verdict
    bounds = page.split("## What bounded each run", 1)[-1].split("## Targets", 1)[0]
    rows = re.findall(
        r"^\| (.+?) \| ([\w-]+) \| ([0-9.]+) \| (\d+%|-) "
        r"\| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+|-) \| (.+) \|$",
        bounds,
        re.M,
    )
    assert len(rows) == 5 * 4 + 1 + 2, bounds  # the 5 variants' 4 scenarios, free, the cache pair
    for _, variant, rate, busy, server, _, _, verdict in rows:
        assert float(rate) > 0 and float(server) >= 0  # a toy run is a few of the kernel's ticks
        assert (busy == "-") == (variant == "original")
        assert verdict in ("the model (CPU)", "host CPU", "none saturated"), verdict
    served = re.search(r"the cache serves ([0-9.]+) images/s, ([0-9.]+)x the", page)
    assert served is not None and float(served[1]) > 0, page
    row = r"\| {} \(.*\) \| ([0-9.]+) ms \| ([0-9.]+) \|"
    costs = re.search(row.format("miss") + r"\n" + row.format("hit"), page)
    assert costs is not None, page
    assert float(costs[1]) > 0 and float(costs[2]) > 0 and float(costs[4]) > 0
    for heading in ("## Machine", "## Throughput and latency", "## Model-only ceiling", "## Targets"):
        assert heading in page
    assert "- cores: " in page
    assert "of the model-only ceiling" in page
    efficiency = re.search(r"\| 2 x 2, 2 MP only \| ([0-9.]+) \| ([0-9.]+) \| (\d+)% \| ([+-]\d+)% \|", page)
    assert efficiency is not None, page
    rate, limit, percent = float(efficiency[1]), float(efficiency[2]), int(efficiency[3])
    assert rate > 0 and limit > 0 and percent == round(100 * rate / limit)
    # the decode paths were timed before and after the load: the limit is from their mean
    timed = re.findall(r"^\| 2 MP \| (.+) \| ([0-9.]+) / ([0-9.]+) \| (yes|no) \|$", page, re.M)
    assert len(timed) == 3, page
    cores = re.search(r"^- cores: (\d+)", page, re.M)
    assert cores is not None, page
    fastest = min((float(a) + float(b)) / 2 for _, a, b, keeps in timed if keeps == "yes")
    rounding = 0.05  # the milliseconds are shown to one decimal
    assert int(cores[1]) * 1000 / (fastest + rounding) <= limit
    assert limit <= int(cores[1]) * 1000 / max(fastest - rounding, 0.01)
    assert "host efficiency, cliplens-free at 2 x 2, 2 MP only" in page
    by_thread = re.search(
        r"\| 2 x 2, 2 MP only \| ([0-9.]+) \| ([0-9.]+) \|.* \| ([0-9.]+) \| [0-9.-]+ \|$", page, re.M
    )
    assert by_thread is not None and float(by_thread[2]) > 0  # the decode workers' CPU was seen
    gil = re.search(r"^\| 2 x 2, 2 MP only \| (.*) \|$", page.split("The GIL held per image", 1)[-1], re.M)
    assert gil is not None, page
    if shutil.which("py-spy", path=str(Path(sys.executable).parent)) and _may_ptrace_a_sibling():
        # sampled: six thread groups, the total, the ceiling ("-" when no sample held the GIL), py-spy's CPU
        cells = gil[1].split(" | ")
        assert len(cells) == 9 and all(re.fullmatch(r"[0-9.]+|-", cell) for cell in cells), gil[0]
    else:
        assert gil[1].startswith("not measured: "), gil[0]


def _may_ptrace_a_sibling() -> bool:
    """Whether py-spy, started by the benchmark, may read the server the benchmark started: with
    CAP_SYS_PTRACE, or where Yama leaves ptrace to the classic same-user rule (scope 0 or none)."""
    status = Path("/proc/self/status")
    if not status.exists():
        return False
    effective = next(
        (line.split()[1] for line in status.read_text().splitlines() if line.startswith("CapEff:")), "0"
    )
    scope = Path("/proc/sys/kernel/yama/ptrace_scope")
    may_by_capability = bool(int(effective, 16) & (1 << 19))  # CAP_SYS_PTRACE
    return may_by_capability or not scope.exists() or scope.read_text().strip() == "0"
