"""Run the service in this process, under uvicorn on a free loopback port, for the demo and experiment.

It is the real server (HTTP, lifespan, background model load), only started from Python instead of
`cliplens serve`, so what the experiment measures is what a deployment would see.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

import httpx
import uvicorn

from cliplens.app import create_app
from cliplens.server import OwnContext
from cliplens.settings import Settings


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServiceStartError(RuntimeError):
    """The in-process service did not become ready."""


class InProcessService:
    """`with InProcessService(settings) as url:` serves the app until the block ends."""

    def __init__(
        self, settings: Settings, host: str = "127.0.0.1", port: int = 0, ready_timeout_s: float = 600
    ) -> None:
        self.settings = settings
        self.host = host
        self.port = port or free_port(host)
        self.ready_timeout_s = ready_timeout_s
        self._failure: BaseException | None = None
        self.app = create_app(settings, on_fatal=self._fatal)
        served = OwnContext(self.app)
        config = uvicorn.Config(served, host=host, port=self.port, log_config=None, access_log=False)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, name="cliplens-uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _fatal(self, exc: BaseException) -> None:
        self._failure = exc
        self.server.should_exit = True

    def __enter__(self) -> str:
        self._thread.start()
        deadline = time.monotonic() + self.ready_timeout_s
        with httpx.Client(base_url=self.url, timeout=5) as client:
            while time.monotonic() < deadline:
                if self._failure is not None:
                    self.__exit__(None, None, None)
                    raise ServiceStartError(str(self._failure)) from self._failure
                if not self._thread.is_alive():
                    raise ServiceStartError("the server thread ended before the service was ready")
                try:
                    if client.get("/readyz").status_code == 200:
                        return self.url
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        self.__exit__(None, None, None)
        raise ServiceStartError(f"the service was not ready within {self.ready_timeout_s:.0f} s")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=60)
