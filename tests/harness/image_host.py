"""A web server on loopback that serves images by URL, path by path, and remembers every request.

The URL-input tests point the service at it: each path has a script, a list of steps taken one per
request (the last step repeats): serve bytes (with or without `Content-Length`), answer a status,
redirect, or stall before serving. Every request is recorded (its path and Host header), so a test
can assert that a refused URL never reached it. It runs in its own thread (the standard library's
threading server), over plain HTTP or, given a server TLS context, HTTPS (the handshake is made when
a connection is accepted: one the client abandons, a certificate it refused, records no request).
"""

from __future__ import annotations

import contextlib
import http.server
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Self
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Serve:
    """200 with `data`; without `Content-Length` (the body ends when the connection closes) unless `sized`."""

    data: bytes
    sized: bool = True


@dataclass(frozen=True)
class Status:
    """An error status with a short body."""

    status: int


@dataclass(frozen=True)
class Redirect:
    """A redirect (302 unless said) to `location`, as given (absolute or relative)."""

    location: str
    status: int = 302


@dataclass(frozen=True)
class Stall:
    """200 with `data`, silent for `seconds` first: before the status line, or after half the body."""

    data: bytes
    seconds: float
    mid_body: bool = False


Step = Serve | Status | Redirect | Stall


class ImageHost:
    """The server; `put` a script for a path, `requests` says what arrived."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self.scheme = "http" if tls is None else "https"
        self._scripts: dict[str, list[Step]] = {}
        self._lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        """(path, Host header) of every request, in order of arrival."""
        host = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                path = urlsplit(self.path).path
                with host._lock:
                    host.requests.append((path, self.headers.get("Host", "")))
                    script = host._scripts.get(path, [Status(404)])
                    step = script.pop(0) if len(script) > 1 else script[0]
                self._answer(step)

            def _answer(self, step: Step) -> None:
                if isinstance(step, Redirect):
                    self.send_response(step.status)
                    self.send_header("Location", step.location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if isinstance(step, Status):
                    body = f"status {step.status}".encode()
                    self.send_response(step.status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if isinstance(step, Stall):
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        self._stall(step)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                if step.sized:
                    self.send_header("Content-Length", str(len(step.data)))
                else:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(step.data)  # the client may stop reading at its cap

            def _stall(self, step: Stall) -> None:
                half = len(step.data) // 2
                if not step.mid_body:
                    time.sleep(step.seconds)
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(step.data)))
                self.end_headers()
                self.wfile.write(step.data[:half])
                self.wfile.flush()
                if step.mid_body:
                    time.sleep(step.seconds)
                self.wfile.write(step.data[half:])

            def log_message(self, format: str, *args: object) -> None:
                return None

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, name="image-host", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def put(self, path: str, *steps: Step) -> None:
        with self._lock:
            self._scripts[path] = list(steps)

    def paths(self, prefix: str = "/") -> list[str]:
        """The paths requested (under `prefix`), in order of arrival."""
        with self._lock:
            return [path for path, _ in self.requests if path.startswith(prefix)]

    def hosts(self, paths: Sequence[str]) -> list[str]:
        """The Host header of each request for these paths."""
        with self._lock:
            return [host for path, host in self.requests if path in paths]

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
