"""What cliplens reads from and tells the machine: named threads."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from cliplens.machine import named_pool


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads thread names from Linux's /proc")
def test_a_named_pools_threads_carry_its_name_in_the_kernel() -> None:
    """top -H, ps -L, profilers and the benchmark's CPU-by-thread table tell the pools apart by it."""
    with named_pool(2, "cliplens-probe") as pool:
        ids = set(pool.map(lambda _: threading.get_native_id(), range(8)))
        names = {Path(f"/proc/{os.getpid()}/task/{tid}/comm").read_text().strip() for tid in ids}
    assert names == {"cliplens-probe"}
    assert (
        Path(f"/proc/{os.getpid()}/task/{threading.get_native_id()}/comm").read_text().strip()
        != "cliplens-probe"
    )
