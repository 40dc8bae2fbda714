"""Serving the app under uvicorn, with the shutdown a load balancer expects.

On SIGTERM (or Ctrl-C) the runtime starts draining at once: `/readyz` answers 503 and new
embeddings requests get 503 `shutting_down`; uvicorn stops accepting connections and lets the
requests in flight finish, for at most `CLIPLENS_SHUTDOWN_GRACE_S`; then the lifespan closes the
model worker, the CPU pool and the storage session, and the process exits with status 0.
If the model cannot be loaded, the server stops and `serve` returns 1.
"""

from __future__ import annotations

import signal
from types import FrameType

import uvicorn

from cliplens.app import create_app
from cliplens.runtime import Runtime
from cliplens.settings import Settings


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which tells the runtime to drain as soon as the exit signal arrives."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime) -> None:
        super().__init__(config)
        self.runtime = runtime

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.runtime.drain()
        super().handle_exit(sig, frame)


def build_server(settings: Settings, host: str, port: int) -> tuple[DrainingServer, list[BaseException]]:
    """The server and the list that collects a fatal start-up error (model not loadable)."""
    failures: list[BaseException] = []
    holder: list[DrainingServer] = []

    def fatal(exc: BaseException) -> None:
        failures.append(exc)
        for server in holder:
            server.should_exit = True

    app = create_app(settings, on_fatal=fatal)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_grace_s)),
    )
    server = DrainingServer(config, app.state.runtime)
    holder.append(server)
    return server, failures


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve(settings: Settings, host: str, port: int) -> int:
    """Run until SIGTERM/SIGINT (then exit status 0) or a failed model load (1)."""
    server, failures = build_server(settings, host, port)
    # uvicorn drains on SIGTERM, then re-raises the signal with the handler found before it started;
    # this one turns that into exit status 0, the status of a clean, requested shutdown.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    server.run()
    return 1 if failures else 0
