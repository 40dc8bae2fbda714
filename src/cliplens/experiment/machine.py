"""The machine a run was measured on, for results.json: timings mean little without it.

CPU model and the instruction sets that decide the model's speed on a CPU (AVX-512, AMX), the
cores this process may use (what the service's pools size themselves from), all three from
cliplens.machine; and memory, GPUs, and the versions of the libraries on the measured path.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

from cliplens.machine import describe_cpu, usable_cpus

_PACKAGES = (
    "cliplens",
    "torch",
    "torchvision",
    "open_clip_torch",
    "pillow",
    "numpy",
    "litestar",
    "uvicorn",
    "gcloud-aio-storage",
    "aiohttp",
    "httpx",
)


def _memory_bytes() -> int | None:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _gpus() -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        gpus.append(
            {
                "name": properties.name,
                "memory_bytes": int(properties.total_memory),
                "capability": f"{properties.major}.{properties.minor}",
            }
        )
    return gpus


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def describe() -> dict[str, Any]:
    """This machine, as results.json records it (the client's machine when the service is remote)."""
    import torch

    cpu = describe_cpu()
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu.model,
        "cpu_flags": list(cpu.flags),
        "architecture": cpu.architecture,
        "cores_logical": os.cpu_count(),
        "cores_usable": usable_cpus(),
        "memory_bytes": _memory_bytes(),
        "gpus": _gpus(),
        "cuda": torch.version.cuda,
        "torch_threads": torch.get_num_threads(),
        "versions": _versions(),
    }
