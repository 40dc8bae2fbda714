"""Exact minimum and maximum per stage, which Prometheus histograms cannot give.

A histogram keeps bucket counts, a sum and a count, so its min and max are only known to a bucket's
width. This collector keeps, for each series, the exact min and max of the observations made in
the last `window_s` seconds (in one-second slots), and exports them as two gauges,
`<base>_min_seconds` and `<base>_max_seconds` (unit-less families, such as the number of requests in
flight, drop the unit). A series with no observation in the window exports nothing, rather than a
stale value or NaN.

Why a sliding window: every observation stays visible for `window_s` seconds, so any scraper
whose interval is shorter than the window sees it at least once, and nothing is reset by a scrape
(two Prometheus servers can scrape the same service). The exact min / max over a dashboard range is
then `min_over_time(<base>_min_seconds[range])` / `max_over_time(<base>_max_seconds[range])`,
covering the observations of [range start - window, range end]; across replicas, the `min` of the
minima and the `max` of the maxima stay exact.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

Clock = Callable[[], float]


class _Series:
    __slots__ = ("slots",)

    def __init__(self) -> None:
        self.slots: dict[int, tuple[float, float]] = {}

    def add(self, slot: int, value: float) -> None:
        low, high = self.slots.get(slot, (math.inf, -math.inf))
        self.slots[slot] = (min(low, value), max(high, value))

    def extremes(self, oldest: int) -> tuple[float, float] | None:
        for slot in [s for s in self.slots if s < oldest]:
            del self.slots[slot]
        if not self.slots:
            return None
        return min(v[0] for v in self.slots.values()), max(v[1] for v in self.slots.values())


class WindowedExtremes(Collector):
    """Exact min / max per series over a sliding window; see the module docstring."""

    def __init__(self, window_s: float, clock: Clock = time.monotonic) -> None:
        if not window_s >= 1:
            raise ValueError(
                f"the extremes window must be at least 1 s (it moves in one-second slots), not {window_s!r}"
            )
        self.window_s = math.ceil(window_s)
        self._clock = clock
        self._families: dict[str, tuple[str, tuple[str, ...], str]] = {}
        self._series: dict[tuple[str, tuple[str, ...]], _Series] = {}
        self._lock = threading.Lock()

    def family(
        self, base: str, documentation: str, labelnames: Sequence[str] = (), unit: str = "seconds"
    ) -> None:
        """Declare `<base>_min_<unit>` and `<base>_max_<unit>` (`<base>_min` / `_max` without a unit)."""
        self._families[base] = (documentation, tuple(labelnames), f"_{unit}" if unit else "")

    def observe(self, base: str, value: float, *labelvalues: str) -> None:
        slot = math.floor(self._clock())
        with self._lock:
            self._series.setdefault((base, labelvalues), _Series()).add(slot, value)

    def current(self, base: str, *labelvalues: str) -> tuple[float, float] | None:
        """(min, max) in the window now, or None; what the next scrape would show."""
        oldest = math.floor(self._clock()) - self.window_s + 1
        with self._lock:
            series = self._series.get((base, labelvalues))
            return None if series is None else series.extremes(oldest)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        oldest = math.floor(self._clock()) - self.window_s + 1
        with self._lock:
            for base, (documentation, labelnames, suffix) in self._families.items():
                window = f" over the last {self.window_s} s (exact)"
                low = GaugeMetricFamily(
                    f"{base}_min{suffix}", f"Minimum of {documentation}{window}", labels=labelnames
                )
                high = GaugeMetricFamily(
                    f"{base}_max{suffix}", f"Maximum of {documentation}{window}", labels=labelnames
                )
                for (name, labelvalues), series in self._series.items():
                    if name != base:
                        continue
                    extremes = series.extremes(oldest)
                    if extremes is not None:
                        low.add_metric(list(labelvalues), extremes[0])
                        high.add_metric(list(labelvalues), extremes[1])
                yield low
                yield high

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())
