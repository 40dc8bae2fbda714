"""Event-loop lag: how late the loop runs what is due, sampled by a small periodic task.

Every download, every hand-off to a worker and every response goes through the one event loop; a
loop kept busy (a long callback, a thread holding the GIL) delays all of them, and in a trace that
looks exactly like slow storage. The monitor sleeps `INTERVAL_S` at a time and observes how much
later than asked it woke up: `cliplens_event_loop_lag_seconds` (histogram) and its exact windowed
min/max. `worst_during(start, end)` answers for one stretch of time, so the `load` stage can say on
its span event that the loop was late while that image was loading (`loop_lag_ms`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from cliplens.telemetry.metrics import Metrics
from cliplens.telemetry.stages import now

INTERVAL_S = 0.05
"""One sample every 50 ms: a blocked stretch shorter than this can hide between two samples only
in part (the sample straddling it still shows the overlap)."""
KEPT_S = 120.0
"""Samples are kept this long for `worst_during` (the longest request deadline is what matters)."""


class LoopLagMonitor:
    """The periodic sampler of one app's event loop; `start` and `stop` from that loop."""

    def __init__(self, metrics: Metrics, interval_s: float = INTERVAL_S) -> None:
        self._metrics = metrics
        self._interval_ns = int(interval_s * 1e9)
        self._samples: deque[tuple[int, int, float]] = deque(maxlen=int(KEPT_S / interval_s))
        """(asked at, woke at, lag in seconds), oldest first."""
        self._due_ns: int | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._sample(), name="cliplens-loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _sample(self) -> None:
        interval_s = self._interval_ns / 1e9
        while True:
            asked = now()
            self._due_ns = asked + self._interval_ns
            await asyncio.sleep(interval_s)
            woke = now()
            lag_s = max(0.0, (woke - self._due_ns) / 1e9)
            self._samples.append((asked, woke, lag_s))
            self._metrics.observe_loop_lag(lag_s)

    def worst_during(self, start_ns: int, end_ns: int) -> float:
        """The most the loop was late, in seconds, in samples overlapping [start_ns, end_ns],
        including a lateness still under way now (the sampler's wake-up not yet run)."""
        worst = 0.0
        if self._due_ns is not None:
            worst = max(0.0, (now() - self._due_ns) / 1e9)
        for asked, woke, lag_s in reversed(self._samples):
            if woke < start_ns:
                break
            if asked <= end_ns:
                worst = max(worst, lag_s)
        return worst
