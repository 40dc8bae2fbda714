"""The threads of the process, by pool, and how busy each pool of workers is.

The study behind cliplens saw the load stage balloon under concurrency and guessed "too many
threads"; these series let that be confirmed or refuted by looking:

- `cliplens_threads{pool}`: the OS threads of the process at scrape time, by the name the pools
  give their threads in the kernel (`MeteredPool`, through machine.name_os_thread): `cpu` (decode
  and preprocess), `text` (tokenising), `io` (file reads, base64), `model` (the batcher's forward
  passes), `torch` (the intra-op threads OpenMP starts from a pool's worker, which inherit that
  worker's kernel name: threads with a pool's name beyond the pool's size) and `other` (the event
  loop, the exporters, the threads of the process's start, everything else).
- `cliplens_cpu_pool_busy_seconds_total{pool}`: worker-seconds spent running tasks, counted as each
  task ends; `rate(...) / cliplens_cpu_pool_workers` is the pool's busy ratio (1 = saturated).
- `cliplens_cpu_pool_queue{pool}`: tasks submitted and not yet picked up by a worker, read at
  scrape time from the pool's own queue (so a task cancelled while queued counts until a worker
  skips it, a few microseconds later).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import ParamSpec, TypeVar

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cliplens.machine import name_os_thread

POOLS: tuple[str, ...] = ("cpu", "text", "io", "model")
"""The worker pools cliplens creates; their threads are named `cliplens-<pool>`."""
THREAD_GROUPS: tuple[str, ...] = (*POOLS, "torch", "other")
_PREFIX = "cliplens-"
_TASKS = Path("/proc/self/task")
_P = ParamSpec("_P")
_R = TypeVar("_R")


class MeteredPool(ThreadPoolExecutor):
    """A pool whose threads are named `cliplens-<pool>` (in the kernel too) and whose tasks' run
    time is added to the pool's busy counter."""

    def __init__(self, workers: int, pool: str, busy_seconds: Counter) -> None:
        name = f"{_PREFIX}{pool}"
        super().__init__(
            max_workers=workers, thread_name_prefix=name, initializer=name_os_thread, initargs=(name,)
        )
        self.pool = pool
        self.workers = workers
        self._busy = busy_seconds.labels(pool)

    def submit(self, fn: Callable[_P, _R], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_R]:
        busy = self._busy

        def timed() -> _R:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                busy.inc(time.perf_counter() - started)

        return super().submit(timed)

    @property
    def queued(self) -> int:
        """Tasks waiting for a worker (the executor's own queue: no bookkeeping on the hot path)."""
        return self._work_queue.qsize()


def _thread_names() -> list[str]:
    """The kernel name of every thread of the process (Python's names where /proc is missing)."""
    try:
        return [(task / "comm").read_text().strip() for task in _TASKS.iterdir()]
    except OSError:
        return [thread.name for thread in threading.enumerate()]


class ThreadsCollector(Collector):
    """`cliplens_threads{pool}`, `cliplens_cpu_pool_workers{pool}` and `cliplens_cpu_pool_queue{pool}`,
    computed at each scrape from the kernel's thread names and the pools this app registered."""

    def __init__(self) -> None:
        self._pools: dict[str, MeteredPool] = {}

    def watch(self, pool: MeteredPool) -> None:
        self._pools[pool.pool] = pool

    def collect(self) -> Iterable[Metric]:
        named = dict.fromkeys(THREAD_GROUPS, 0)
        for name in _thread_names():
            pool = name.removeprefix(_PREFIX).split("_")[0] if name.startswith(_PREFIX) else "other"
            named[pool if pool in POOLS else "other"] += 1
        counts = dict.fromkeys(THREAD_GROUPS, 0)
        counts["other"] = named["other"]
        for pool in POOLS:  # threads a pool's worker started (OpenMP's) inherit its kernel name
            own = min(named[pool], self._pools[pool].workers) if pool in self._pools else named[pool]
            counts[pool] = own
            counts["torch"] += named[pool] - own
        threads = GaugeMetricFamily(
            "cliplens_threads", "OS threads of the process, by pool.", labels=["pool"]
        )
        for group, count in counts.items():
            threads.add_metric([group], count)
        yield threads
        workers = GaugeMetricFamily(
            "cliplens_cpu_pool_workers", "Worker threads each pool may run at once.", labels=["pool"]
        )
        queue = GaugeMetricFamily(
            "cliplens_cpu_pool_queue", "Tasks waiting for a worker of the pool.", labels=["pool"]
        )
        for name, watched in self._pools.items():
            workers.add_metric([name], watched.workers)
            queue.add_metric([name], watched.queued)
        yield workers
        yield queue

    def describe(self) -> Iterable[Metric]:
        return []
