"""A real `cliplens serve` process on a free port, for tests that attack or stop it from outside."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from cliplens.experiment.inprocess import free_port
from cliplens.experiment.processes import stop_process, wait_until_answering
from tests.harness.servers import child_environment


class Service:
    """A `cliplens serve` process on a free port, with its log in a file."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process = process
        self.url = url
        self.log = log

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_kib(self, field: str = "VmRSS") -> int:
        """A memory figure of the process from /proc (VmRSS now, VmHWM its peak), in KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise AssertionError(f"no {field}")

    def reset_peak(self) -> int:
        """Reset the kernel's peak-RSS mark (VmHWM) to the RSS now, and return that RSS in KiB."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")
        return self.rss_kib()

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        raise AssertionError(f"{name}{labels} is not in /metrics")


@contextmanager
def serving(tiny_model: str, tmp_path: Path, **env: str) -> Iterator[Service]:
    port = free_port()
    environment = child_environment(
        CLIPLENS_MODEL=tiny_model,
        CLIPLENS_PRETRAINED="none",
        CLIPLENS_CPU_WORKERS="2",
        CLIPLENS_MODEL_THREADS="1",
        CLIPLENS_LOG_LEVEL="WARNING",
        CLIPLENS_ON_ERROR="partial",  # as tests/conftest.py's PARTIAL says
    )
    environment.update(env)
    log = tmp_path / f"serve-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "cliplens.cli", "serve", "--port", str(port)],
            env=environment,
            stdout=sink,
            stderr=sink,
        )
    service = Service(process, f"http://127.0.0.1:{port}", log)
    try:
        problem = wait_until_answering(f"{service.url}/readyz", process, 120)
        assert problem is None, f"{problem}: {log.read_text()[-3000:]}"
        yield service
    finally:
        stop_process(process, 30)


def log_problems(service: Service) -> list[str]:
    """Lines of the service log that say something went wrong at the Python level."""
    markers: tuple[str, ...] = ("Traceback", "Unclosed", "Task was destroyed", "never awaited")
    markers += ('"level": "error"', '"level": "critical"')
    return [line for line in service.log.read_text().splitlines() if any(m in line for m in markers)]


def wait_for(predicate: Callable[[], bool], timeout_s: float = 20) -> None:
    """Poll `predicate` until it holds; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
