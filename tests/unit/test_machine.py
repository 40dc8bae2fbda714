"""What cliplens reads from and tells the machine: named threads, OpenMP's spinning."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from cliplens.machine import OPENMP_SPIN_COUNT, bound_openmp_spinning
from cliplens.telemetry.metrics import Metrics


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from Linux's /proc")
def test_a_named_pools_threads_carry_its_name_in_the_kernel() -> None:
    """top -H, ps -L, profilers and the benchmark's CPU-by-thread table tell the pools apart by it."""
    metrics = Metrics(CollectorRegistry())
    with metrics.pool(2, "cpu") as pool:
        ids = set(pool.map(lambda _: threading.get_native_id(), range(8)))
        names = {Path(f"/proc/{os.getpid()}/task/{tid}/comm").read_text().strip() for tid in ids}
        threads = metrics.registry.get_sample_value("cliplens_threads", {"pool": "cpu"})
    assert names == {"cliplens-cpu"} and threads is not None and len(ids) <= threads <= 2
    assert (
        Path(f"/proc/{os.getpid()}/task/{threading.get_native_id()}/comm").read_text().strip()
        != "cliplens-cpu"
    )
    busy = metrics.registry.get_sample_value("cliplens_cpu_pool_busy_seconds_total", {"pool": "cpu"})
    assert busy is not None and busy > 0


def test_openmp_spinning_is_bounded_unless_the_operator_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    bound_openmp_spinning()
    assert os.environ["GOMP_SPINCOUNT"] == OPENMP_SPIN_COUNT
    monkeypatch.setenv("GOMP_SPINCOUNT", "5000")
    bound_openmp_spinning()
    assert os.environ["GOMP_SPINCOUNT"] == "5000"


def test_the_cli_bounds_openmp_spinning_before_torch_is_imported() -> None:
    """libgomp reads GOMP_SPINCOUNT once, when torch loads: the CLI must set it before that."""
    code = (
        "import os, sys\n"
        "from cliplens import cli\n"
        "assert 'torch' not in sys.modules, 'importing the CLI loaded torch'\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "sys.stdout.write('\\nGOMP_SPINCOUNT=' + os.environ.get('GOMP_SPINCOUNT', 'unset'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == f"GOMP_SPINCOUNT={OPENMP_SPIN_COUNT}"
