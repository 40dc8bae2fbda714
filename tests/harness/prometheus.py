"""A real Prometheus on a free loopback port, run from a copy of the project's observability/ folder.

The `cliplens` job is pointed at the service under test and every interval is shortened to
`SCRAPE_S`, so that a test load of a minute is enough for the dashboards' queries and the rules.
Prometheus is the Debian package's binary (`prometheus` on PATH; scripts/test installs it). A
missing binary fails the test: nothing is skipped.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Self

import httpx
import yaml

from cliplens.experiment.inprocess import free_port
from cliplens.experiment.processes import stop_process, wait_until_answering
from tests.harness.tools import debian, required

ROOT = Path(__file__).resolve().parents[2]
OBSERVABILITY = ROOT / "observability"
SCRAPE_S = 1
"""Scrape, rule evaluation and scrape timeout, in seconds."""


class PrometheusServer:
    """A real Prometheus on a free loopback port, from a copy of the project's observability/."""

    def __init__(self, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_dir = workdir / "observability"
        shutil.copytree(OBSERVABILITY, self.config_dir)
        self.config_path = self.config_dir / "prometheus.yml"
        config = yaml.safe_load(self.config_path.read_text())
        interval = f"{SCRAPE_S}s"
        config["global"].update(
            scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval
        )
        jobs = [job for job in config["scrape_configs"] if job["job_name"] == "cliplens"]
        assert len(jobs) == 1, "observability/prometheus.yml must have one `cliplens` job"
        for discovery in [key for key in jobs[0] if key.endswith("_sd_configs")]:
            del jobs[0][discovery]  # compose finds the replicas by DNS; here there is one, on loopback
        jobs[0]["static_configs"] = [{"targets": [target]}]
        config["scrape_configs"] = jobs
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.data_dir = workdir / "data"
        self.log_path = workdir / "prometheus.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> Self:
        binary = required("prometheus", debian("prometheus"))
        self.started_at = time.time()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.data_dir}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--enable-feature=exemplar-storage",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        problem = wait_until_answering(f"{self.url}/-/ready", self.process, 30, request_timeout_s=1)
        if problem:
            raise AssertionError(f"prometheus {problem}: {self.log_path.read_text()[-2000:]}")
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 10)
        self.process = None

    def api(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = response.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body}")
        return body["data"]

    def instant(self, expr: str, at: float) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr, time=f"{at:.3f}")["result"])

    def value(self, expr: str, at: float) -> float:
        result = self.instant(expr, at)
        assert len(result) == 1, f"{expr} at {at}: {result}"
        return float(result[0]["value"][1])

    def by_label(self, expr: str, at: float, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.instant(expr, at)}

    def range(self, expr: str, start: float, end: float, step: str = f"{SCRAPE_S}s") -> list[dict[str, Any]]:
        return list(
            self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=step)["result"]
        )
