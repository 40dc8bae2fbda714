"""The GPU the model runs on, as gauges read at each scrape (registered only on a CUDA device).

- `cliplens_gpu_utilization_ratio{device}`: the fraction of the last sample period in which a
  kernel ran on the device (NVML's "GPU utilisation"; needs NVML, `pip install cliplens[gpu]`).
- `cliplens_gpu_memory_used_bytes{device}` / `cliplens_gpu_memory_total_bytes{device}`: the whole
  device, every process on it (NVML, or CUDA's own `mem_get_info` where NVML is missing).
- `cliplens_gpu_model_memory_bytes{device}`: what this process's torch holds on it (the weights,
  activations and torch's allocator cache), so the model's share of the device is one division.

`device` is the CUDA index as this process sees it. A reading that fails (a driver hiccup) is
left out of that scrape rather than failing `/metrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One device at one moment; None where the source cannot tell."""

    utilization_ratio: float | None
    memory_used_bytes: int
    memory_total_bytes: int
    process_bytes: int


Reader = Callable[[int], GpuReading]


def torch_reader(index: int) -> GpuReading:
    """CUDA's own view: device memory, and what this process's allocator holds; no utilisation."""
    free, total = torch.cuda.mem_get_info(index)
    return GpuReading(None, total - free, total, torch.cuda.memory_reserved(index))


def nvml_reader() -> Reader | None:
    """A reader through NVML (package nvidia-ml-py), or None where it is missing or fails to start."""
    try:
        import pynvml  # type: ignore[import-not-found,unused-ignore]

        pynvml.nvmlInit()
    except Exception as exc:  # not installed, no driver library: CUDA's own view instead
        log.info("GPU gauges without NVML (utilisation not reported): %s", exc)
        return None
    nvml: Any = pynvml

    def read(index: int) -> GpuReading:
        # NVML numbers devices physically; torch's index follows CUDA_VISIBLE_DEVICES, so the
        # device is found by its UUID, the one name both agree on.
        uuid = str(torch.cuda.get_device_properties(index).uuid)
        handle = nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        utilization = nvml.nvmlDeviceGetUtilizationRates(handle)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        return GpuReading(
            utilization.gpu / 100.0, int(memory.used), int(memory.total), torch.cuda.memory_reserved(index)
        )

    return read


class GpuCollector(Collector):
    """The four GPU gauges for the devices given, from `reader` (NVML where it works)."""

    def __init__(self, devices: Iterable[int], reader: Reader | None = None) -> None:
        self.devices = tuple(devices)
        self._read = reader or nvml_reader() or torch_reader

    def collect(self) -> Iterable[Metric]:
        utilization = GaugeMetricFamily(
            "cliplens_gpu_utilization_ratio",
            "Fraction of the last sample period a kernel ran on the GPU (NVML).",
            labels=["device"],
        )
        used = GaugeMetricFamily(
            "cliplens_gpu_memory_used_bytes", "GPU memory in use by every process.", labels=["device"]
        )
        total = GaugeMetricFamily("cliplens_gpu_memory_total_bytes", "GPU memory in all.", labels=["device"])
        model = GaugeMetricFamily(
            "cliplens_gpu_model_memory_bytes",
            "GPU memory this process's torch holds (model weights, activations, allocator cache).",
            labels=["device"],
        )
        for index in self.devices:
            try:
                reading = self._read(index)
            except Exception as exc:
                log.warning("GPU %d could not be read: %s", index, exc)
                continue
            label = [str(index)]
            if reading.utilization_ratio is not None:
                utilization.add_metric(label, reading.utilization_ratio)
            used.add_metric(label, reading.memory_used_bytes)
            total.add_metric(label, reading.memory_total_bytes)
            model.add_metric(label, reading.process_bytes)
        yield from (utilization, used, total, model)

    def describe(self) -> Iterable[Metric]:
        return []
