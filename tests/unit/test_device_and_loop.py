"""The GPU gauges (with a reader standing in for the device this machine lacks) and the event-loop
lag monitor on a real loop."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, generate_latest

from cliplens.telemetry.device import GpuCollector, GpuReading
from cliplens.telemetry.loop import LoopLagMonitor
from cliplens.telemetry.metrics import Metrics
from cliplens.telemetry.stages import now


def test_gpu_gauges_per_device_and_a_failing_device_is_left_out() -> None:
    def read(index: int) -> GpuReading:
        if index == 1:
            raise RuntimeError("driver hiccup")
        return GpuReading(0.75, 40 * 2**30, 141 * 2**30, 3 * 2**30)

    registry = CollectorRegistry()
    registry.register(GpuCollector([0, 1], reader=read))
    assert registry.get_sample_value("cliplens_gpu_utilization_ratio", {"device": "0"}) == 0.75
    assert registry.get_sample_value("cliplens_gpu_memory_used_bytes", {"device": "0"}) == 40 * 2**30
    assert registry.get_sample_value("cliplens_gpu_memory_total_bytes", {"device": "0"}) == 141 * 2**30
    assert registry.get_sample_value("cliplens_gpu_model_memory_bytes", {"device": "0"}) == 3 * 2**30
    assert b'device="1"' not in generate_latest(registry)


def test_without_nvml_the_utilisation_is_absent_not_zero() -> None:
    registry = CollectorRegistry()
    registry.register(GpuCollector([0], reader=lambda index: GpuReading(None, 1, 2, 1)))
    assert registry.get_sample_value("cliplens_gpu_utilization_ratio", {"device": "0"}) is None
    assert registry.get_sample_value("cliplens_gpu_memory_total_bytes", {"device": "0"}) == 2


def test_loop_lag_is_seen_in_the_stretch_that_blocked_and_not_in_a_quiet_one() -> None:
    metrics = Metrics(CollectorRegistry())

    async def scenario() -> tuple[float, float]:
        monitor = LoopLagMonitor(metrics, interval_s=0.01)
        monitor.start()
        await asyncio.sleep(0.05)
        quiet_start = now()
        await asyncio.sleep(0.05)
        quiet = monitor.worst_during(quiet_start, now())
        blocked_start = now()
        time.sleep(0.12)  # the loop is held: nothing else runs
        await asyncio.sleep(0)
        blocked = monitor.worst_during(blocked_start, now())
        await asyncio.sleep(0.03)
        await monitor.stop()
        return quiet, blocked

    quiet, blocked = asyncio.run(scenario())
    assert blocked >= 0.1
    assert quiet < blocked
    assert metrics.registry.get_sample_value("cliplens_event_loop_lag_max_seconds") >= 0.1  # type: ignore[operator]
    count = metrics.registry.get_sample_value("cliplens_event_loop_lag_seconds_count")
    assert count is not None and count >= 5
