"""Several cliplens replicas on one machine: real `cliplens serve` processes behind a real HAProxy.

What the multi-replica test (tests/integration/test_replicas.py) and the workers measurement
(deploy/local/compare_workers.py) start, on free loopback ports:

- `ServeProcess`: `python -m cliplens.cli serve`, the command a container runs, with its settings in
  the environment, as a Kubernetes pod gets them from its ConfigMap;
- `Haproxy`: Debian's HAProxy running the compose stack's own deploy/compose/haproxy.cfg, with the
  `server-template` line (Docker DNS) replaced by one `server` line per replica: round-robin per
  request, health checks on /readyz, as in `docker compose up --scale api=N`.

A missing `haproxy` binary fails (scripts/test installs Debian's package): nothing is skipped.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from cliplens.experiment.inprocess import free_port
from cliplens.experiment.processes import stop_process, wait_until_answering
from tests.harness.servers import child_environment
from tests.harness.tools import debian, required

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_HAPROXY = ROOT / "deploy" / "compose" / "haproxy.cfg"


class ServeProcess:
    """One `cliplens serve` process on a free loopback port (one replica)."""

    def __init__(self, name: str, environment: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.address = f"127.0.0.1:{self.port}"
        self.environment = dict(environment)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServeProcess:
        """Start the process; `wait_ready` waits for its model."""
        env = child_environment(**self.environment)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cliplens.cli",
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        return self

    def wait_ready(self, timeout_s: float = 120) -> None:
        assert self.process is not None
        problem = wait_until_answering(f"{self.url}/readyz", self.process, timeout_s)
        if problem:
            raise AssertionError(f"{self.name} {problem}: {self.log_path.read_text()[-3000:]}")

    def stop(self, timeout_s: float = 30) -> int | None:
        """SIGTERM (the drain a pod gets), then the exit status; killed if it does not exit in time."""
        if self.process is None:
            return None
        status = stop_process(self.process, timeout_s)
        self.process = None
        return status


def start_replicas(
    count: int, environment: Mapping[str, str], workdir: Path, names: Sequence[str] | None = None
) -> list[ServeProcess]:
    """`count` replicas started together (their model loads overlap), each ready on return."""
    names = list(names) if names is not None else [f"replica-{i}" for i in range(count)]
    replicas = [ServeProcess(names[i], environment, workdir / f"{names[i]}.log") for i in range(count)]
    try:
        for replica in replicas:
            replica.start()
        for replica in replicas:
            replica.wait_ready()
    except BaseException:
        for replica in replicas:
            replica.stop()
        raise
    return replicas


def haproxy_config(addresses: Sequence[str], port: int, template: Path = COMPOSE_HAPROXY) -> str:
    """The compose proxy's config, bound to loopback `port`, balancing over `addresses`."""
    text = template.read_text()
    servers = "\n".join(f"    server api{i} {address} check" for i, address in enumerate(addresses))
    text, replaced = re.subn(r"^ *server-template .*$", servers, text, flags=re.MULTILINE)
    assert replaced == 1, f"{template} must have one `server-template` line"
    text, rebound = re.subn(r"^( *bind) :8000$", rf"\1 127.0.0.1:{port}", text, flags=re.MULTILINE)
    assert rebound == 1, f"{template} must bind :8000 once"
    # Docker's DNS is not here, and no server uses it any more.
    return re.sub(r"^resolvers docker\n(?: .*\n)+\n", "", text, flags=re.MULTILINE)


class Haproxy:
    """Debian's HAProxy on a free loopback port, in the foreground, logging to a file."""

    def __init__(self, addresses: Sequence[str], workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "haproxy.cfg"
        self.config_path.write_text(haproxy_config(addresses, self.port))
        self.log_path = workdir / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def binary() -> str:
        return required("haproxy", debian("haproxy"))

    def start(self, timeout_s: float = 20) -> Haproxy:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [self.binary(), "-db", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        problem = wait_until_answering(f"{self.url}/readyz", self.process, timeout_s)
        if problem:
            raise AssertionError(f"haproxy {problem}: {self.log_path.read_text()[-2000:]}")
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 10)
        self.process = None
