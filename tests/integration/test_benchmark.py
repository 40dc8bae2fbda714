"""The benchmark runs end to end at a toy size (it proves it works; no timing is asserted)."""

from __future__ import annotations

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
    for variant in ("original", "cliplens-default", "cliplens-float32"):
        assert page.count(f"| {variant} |") == 8, variant
    for heading in ("## Machine", "## Throughput and latency", "## Model-only ceiling", "## Targets"):
        assert heading in page
    assert "- cores: " in page
    assert "of the model-only ceiling" in page
