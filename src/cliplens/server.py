"""Serving the app under uvicorn: slow clients cut off, connections bounded, a shutdown that answers.

**Slow clients.** uvicorn (h11) waits for a request's headers and body for as long as the client
takes, so a client sending one byte a second holds a connection forever. Here:
- `CLIPLENS_HEADER_TIMEOUT_S` (10 s): from the connection, or from the first byte of the next
  request on a kept-alive connection, to the end of the request's headers. Then the connection is
  closed, after a 408 if part of a request had arrived (`GuardedH11Protocol`).
- `CLIPLENS_BODY_TIMEOUT_S` (30 s): the longest wait for the next piece of a request body. Then
  the client gets a 408 if nothing was answered yet, and the app sees it as gone (`RequestGuard`).
- `CLIPLENS_MAX_CONNECTIONS` (1024): open connections; one more is answered 429 `overloaded` at
  once and closed, before it can hold anything. uvicorn's own `limit_concurrency` is not used:
  it only answers after the headers (so it bounds nothing while they trickle in), in plain text.
- An idle kept-alive connection is closed after uvicorn's `timeout_keep_alive` (5 s).
Every answer given here has the service's JSON error shape (api/errors.py).

**Shutdown**, timed from the SIGTERM (or Ctrl-C), with grace = `CLIPLENS_SHUTDOWN_GRACE_S`:
1. at once, the runtime drains: `/readyz` answers 503 and new requests 503 `shutting_down`.
   The listener stays open, so a client routed here late gets that answer (with
   `Connection: close`, so its retry opens a connection elsewhere), not "connection refused";
2. the requests in flight at the signal run on; the runtime cuts their work 1 s before the grace
   period ends (`DRAIN_MARGIN_S`, pipeline/service.py), so what is left comes back as `timeout`
   items of a normal 200 while the server still waits for it;
3. when the last of them is answered, or at grace at the latest, the listener closes and idle
   connections are closed. A request still running at grace (a body still arriving) is cancelled
   and answered 503 `shutting_down`, never uvicorn's 500 text/plain; answers being written, and
   requests begun after the signal, get up to `FLUSH_S` (1 s) more;
4. the lifespan closes the model worker, the CPU pool and the storage session; exit status 0.
So the process exits at most grace + ~1 s + the close after the signal: Kubernetes'
`terminationGracePeriodSeconds` is the preStop pause + grace + a margin (docs/scaling.md).
If the model cannot be loaded, the server stops and `serve` returns 1.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import signal
import socket
import sys
import time
from dataclasses import dataclass
from http import HTTPStatus
from types import FrameType
from typing import ClassVar

import h11
import msgspec
import uvicorn
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, ReceiveMessage, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from cliplens.api.errors import RESPONSES
from cliplens.api.schemas import ErrorBody, ErrorDetail
from cliplens.app import create_app
from cliplens.runtime import Runtime
from cliplens.settings import Settings
from cliplens.vocabulary import RequestErrorCode, ShuttingDown

log = logging.getLogger(__name__)

FLUSH_S = 1
"""After the drain, how long answers still being written get before uvicorn cancels what is left."""


def error_answer(code: RequestErrorCode, message: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body of an error answered below the app, in the app's shape (api/errors.py: the
    code's status, type and headers), closing the connection."""
    answer = RESPONSES[code]
    detail = ErrorDetail(message=message, type=answer.type, code=code.value)
    body = msgspec.json.encode(ErrorBody(error=detail))
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *((name.lower().encode(), value.encode()) for name, value in answer.headers.items()),
    ]
    return headers, body


def raw_answer(code: RequestErrorCode, message: str) -> bytes:
    """`error_answer` as HTTP/1.1 bytes, for a connection h11 has no request on."""
    headers, body = error_answer(code, message)
    status = RESPONSES[code].status
    head = f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()
    return head + b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n" + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header read timeout and a bound on open connections.

    Configured through `guarded_protocol`, because uvicorn builds one instance per connection from
    the class alone. Only uvicorn's protocol callbacks are extended, each after uvicorn's own.
    """

    header_timeout_s: ClassVar[float] = 10.0
    max_connections: ClassVar[int] = 1024
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.debug("refused a connection: %d open", len(self.connections) - 1)
            message = f"more than {self.max_connections} open connections; retry shortly"
            transport.write(raw_answer(RequestErrorCode.OVERLOADED, message))
            transport.close()
            return
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request's head is (still) on its way
            self._arm_header_timer()
        else:
            self._cancel_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        partial, _ = self.conn.trailing_data
        if partial:  # part of a request arrived: say why it is cut off
            message = f"the request headers did not arrive within {self.header_timeout_s:g} s"
            self.transport.write(raw_answer(RequestErrorCode.REQUEST_TIMEOUT, message))
        log.debug("closed a connection whose request headers did not arrive in time")
        self.transport.close()


def guarded_protocol(header_timeout_s: float, max_connections: int) -> type[GuardedH11Protocol]:
    """`GuardedH11Protocol` with these limits, for `uvicorn.Config(http=...)`."""

    class Configured(GuardedH11Protocol):
        pass

    Configured.header_timeout_s = header_timeout_s
    Configured.max_connections = max_connections
    return Configured


@dataclass
class _Exchange:
    """What one request's guard has seen."""

    started: bool = False
    """The response has begun: nothing else can be answered."""
    answered: bool = False
    """The guard answered itself (body timeout): the app's own answer goes nowhere."""
    body_done: bool = False
    """The body has been read (or given up on): later receives wait for a disconnect, unbounded."""


class OwnContext:
    """ASGI middleware: each request runs in a context of its own, never in one a previous request
    left on its connection.

    uvicorn starts a request's task in the context its connection's read callback runs in, and a
    transport resumed after flow control (a body larger than 64 KiB) runs that callback in a copy of
    the context of the request that resumed it, that request's current span included: every later
    request on the connection answered with that request's X-Trace-Id, and its spans and exemplars
    joined that trace. The app runs in a task with an empty context instead (cancelling the
    request's task cancels it too)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def request() -> None:
            await self.app(scope, receive, send)

        await asyncio.get_running_loop().create_task(request(), context=contextvars.Context())


class RequestGuard:
    """ASGI middleware between uvicorn and the app: the body read timeout, `Connection: close` on
    every answer during the drain, and a JSON answer for a request cancelled when the grace period
    ends (without it uvicorn answers 500 text/plain)."""

    def __init__(self, app: ASGIApp, runtime: Runtime, body_timeout_s: float) -> None:
        self.app = app
        self.runtime = runtime
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        exchange = _Exchange()

        async def guarded_receive() -> ReceiveMessage:
            if exchange.body_done:
                return await receive()
            try:
                async with asyncio.timeout(self.body_timeout_s):
                    message: ReceiveMessage = await receive()
            except TimeoutError:
                exchange.body_done = True
                if not exchange.started:
                    exchange.answered = True
                    text = f"the request body stalled for {self.body_timeout_s:g} s"
                    await self._answer(send, RequestErrorCode.REQUEST_TIMEOUT, text)
                return {"type": "http.disconnect"}
            if message["type"] != "http.request" or not message.get("more_body", False):
                exchange.body_done = True
            return message

        async def guarded_send(message: Message) -> None:
            if exchange.answered:
                return
            if message["type"] == "http.response.start":
                exchange.started = True
                if self.runtime.draining:  # so that the client's next request goes elsewhere
                    message["headers"] = [*message.get("headers", []), (b"connection", b"close")]
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except asyncio.CancelledError:
            if exchange.started or exchange.answered:
                raise
            # the server cancelled it at the end of the grace period (the only canceller of a request)
            await self._answer(send, RequestErrorCode.SHUTTING_DOWN, ShuttingDown().message)

    @staticmethod
    async def _answer(send: Send, code: RequestErrorCode, message: str) -> None:
        headers, body = error_answer(code, message)
        await send({"type": "http.response.start", "status": RESPONSES[code].status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which drains the runtime at the exit signal and keeps listening while the
    requests in flight then finish (see the module docstring for the timing)."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime, grace_s: float) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.grace_s = grace_s
        self.signalled_at: float | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.signalled_at is None:
            self.signalled_at = time.monotonic()
        self.runtime.drain()
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self._finish_in_flight()
        await super().shutdown(sockets)

    async def _finish_in_flight(self) -> None:
        """Wait, listener open, for the requests in flight at the signal, up to the grace period;
        cancel those still running then (`RequestGuard` answers them)."""
        until = (self.signalled_at or time.monotonic()) + self.grace_s
        running = set(self.server_state.tasks)
        if running:
            log.info("draining: waiting for %d request(s) in flight; new ones get 503", len(running))
        while running and not self.force_exit and (left := until - time.monotonic()) > 0:
            _, running = await asyncio.wait(running, timeout=min(left, 0.1))
        if running:
            log.warning(
                "timeout graceful shutdown exceeded (%g s): %d request(s) cancelled, "
                "each answered 503 shutting_down",
                self.grace_s,
                len(running),
            )
            for task in running:
                task.cancel("the shutdown grace period ended")


def settle_heap() -> None:
    """Once the model is loaded: collect, then freeze what start-up made (`gc.freeze`).

    Imports, the model and the app leave about half a million Python objects that live as long as
    the process; every full collection walked them all, ~200 ms with the event loop stopped (probes
    and requests waited it out, as often as a fast load, cache hits, triggered one). Frozen, they
    are never walked again: a full collection then takes what serving made, about a millisecond.
    """
    gc.collect()
    gc.freeze()


def build_server(settings: Settings, host: str, port: int) -> tuple[DrainingServer, list[BaseException]]:
    """The server and the list that collects a fatal start-up error (model not loadable)."""
    failures: list[BaseException] = []
    holder: list[DrainingServer] = []

    def fatal(exc: BaseException) -> None:
        failures.append(exc)
        for server in holder:
            server.should_exit = True

    app = create_app(settings, on_fatal=fatal, on_ready=settle_heap)
    runtime: Runtime = app.state.runtime
    protocol = guarded_protocol(
        header_timeout_s=settings.header_timeout_s, max_connections=settings.max_connections
    )
    config = uvicorn.Config(
        RequestGuard(OwnContext(app), runtime, body_timeout_s=settings.body_timeout_s),
        host=host,
        port=port,
        http=protocol,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=FLUSH_S,
    )
    server = DrainingServer(config, runtime, grace_s=settings.shutdown_grace_s)
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
    for failure in failures[:1]:
        sys.stderr.write(f"cliplens: {failure}\n")
    return 1 if failures else 0
