"""What the machine gives this process: the cores it may use, and what its CPU can do.

The service sizes its CPU pool and torch's threads from `usable_cpus()`, the experiment and the
benchmarks record `describe_cpu()` next to their timings (a number means little without the CPU it
was measured on). Everything is read from the running system (the affinity mask, the cgroup's
`cpu.max`, `/proc/cpuinfo`), never assumed; the module needs nothing beyond the standard library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "f16c", "fma")
"""The instruction sets that decide the model's speed on a CPU (bf16 matmuls need AVX-512 BF16 or
AMX); `describe_cpu()` reports which of them this CPU has."""


_PR_SET_NAME = 15


def _libc_prctl() -> Callable[..., int] | None:
    if platform.system() != "Linux":
        return None
    name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(name), "prctl", None) if name else None


_PRCTL = _libc_prctl()


def name_os_thread(name: str) -> None:
    """Give the calling thread `name` in the kernel too (`top -H`, `ps -L`, /proc/*/task/*/comm and
    profilers show it; Python before 3.14 names only its own thread objects). Linux keeps 15 bytes."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


OPENMP_SPIN_COUNT = "100"
"""How long torch's OpenMP threads busy-wait for more work after each parallel region, in spins.
libgomp's default, 300,000 (milliseconds of spinning), pays off when the model owns the cores; in
cliplens the model's threads share them with the decode workers, and a spinning thread takes a core
a decode worker needs. libgomp falls back to 100 on its own only while it counts more OpenMP threads
than cores, which depended on which threads happened to exist: measured on 2 cores with the
free-model benchmark, the same code served 2 MP photos at 92-102 or 140-167 images/s, the model's
threads burning 9 or 1.8 CPU ms per image. 100 keeps the fast case, whatever threads exist."""


def bound_openmp_spinning() -> None:
    """Set `GOMP_SPINCOUNT` (libgomp, torch's OpenMP on Linux) to `OPENMP_SPIN_COUNT` unless the
    operator set it. libgomp reads it once, when torch is first imported: call this before that."""
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT)


def cgroup_cpu_limit(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """Whole cores of a cgroup v2 CPU quota (a container's CPU limit), or None when unlimited."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def usable_cpus() -> int:
    """The cores this process may use: its affinity mask, capped by a container's CPU limit."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        cores = max(1, os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    return min(cores, limit) if limit else cores


@dataclass(frozen=True)
class CpuDescription:
    """The CPU as a results file records it."""

    model: str
    """`model name` from /proc/cpuinfo, else what `platform` knows (processor, then architecture)."""
    flags: tuple[str, ...]
    """Those of `CPU_FLAGS` the CPU reports, in `CPU_FLAGS` order."""
    architecture: str


def describe_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuDescription:
    """This machine's CPU: its model and which of `CPU_FLAGS` it has, as the kernel reports them."""
    model: str | None = None
    flags: tuple[str, ...] = ()
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            present = set(value.split())
            flags = tuple(flag for flag in CPU_FLAGS if flag in present)
    return CpuDescription(
        model=model or platform.processor() or platform.machine(),
        flags=flags,
        architecture=platform.machine(),
    )
