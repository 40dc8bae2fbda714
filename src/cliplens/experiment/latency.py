"""A TCP proxy on loopback that makes a local storage emulator answer like a real bucket.

On one machine, fake-gcs-server answers in well under a millisecond and at memory speed, so the
`load` stage looks nothing like the study's (60-80 ms to the first byte of each object, a few
tens of Mbit/s per connection). This proxy sits between the service and the emulator and adds
both, with the real network mechanics left in place (the service's connection pool, keep-alive,
TCP back-pressure):

- a delay per request: each HTTP request on a connection is held `delay_ms` (+- `jitter_ms`)
  before it is forwarded. A request is recognised without parsing HTTP: bytes from the client
  that arrive on a fresh connection, or after the server has answered on it, begin a new request
  (HTTP/1.1 without pipelining, which is what aiohttp and httpx speak);
- a byte rate per connection and direction: each chunk is released only when a link of
  `rate_mbps` would have finished carrying it, so an object of B bytes takes B * 8 / rate to
  arrive on one connection, and N connections get N times the rate, like GCS.

It listens on a loopback address only and runs its own event loop in a thread, so the service
(in-process or not) and the experiment's client are unaffected by its pacing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import threading
from dataclasses import dataclass
from types import TracebackType

_CHUNK = 64 * 1024


def _check_loopback(host: str) -> None:
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the latency proxy listens on loopback addresses only, not {host!r}")


@dataclass
class ProxyCounters:
    """What went through the proxy: tests and results.json check that the delay was really applied."""

    connections: int = 0
    requests: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    delayed_ms: float = 0.0


class _Link:
    """One direction of one connection: a pacer that releases bytes at the link's rate."""

    def __init__(self, bytes_per_s: float | None) -> None:
        self.bytes_per_s = bytes_per_s
        self.free_at = 0.0

    async def carry(self, size: int) -> None:
        if self.bytes_per_s is None:
            return
        now = asyncio.get_running_loop().time()
        self.free_at = max(self.free_at, now) + size / self.bytes_per_s
        if self.free_at > now:
            await asyncio.sleep(self.free_at - now)


class LatencyProxy:
    """`with LatencyProxy("127.0.0.1", 4443, delay_ms=70, rate_mbps=40) as proxy:` use `proxy.url`."""

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        delay_ms: float = 0.0,
        rate_mbps: float | None = None,
        jitter_ms: float = 0.0,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int | None = None,
    ) -> None:
        _check_loopback(host)
        if delay_ms < 0 or jitter_ms < 0 or jitter_ms > delay_ms:
            raise ValueError("delay_ms and jitter_ms must be >= 0, and jitter_ms <= delay_ms")
        if rate_mbps is not None and rate_mbps <= 0:
            raise ValueError("rate_mbps must be > 0 (or None for no limit)")
        self.upstream = (upstream_host, upstream_port)
        self.delay_ms = delay_ms
        self.jitter_ms = jitter_ms
        self.rate_mbps = rate_mbps
        self.host = host
        self.port = port
        self.counters = ProxyCounters()
        self._random = random.Random(seed)
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._thread = threading.Thread(target=self._run, name="cliplens-latency-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def describe(self) -> dict[str, object]:
        """The injected conditions and what went through, for results.json."""
        return {
            "delay_ms": self.delay_ms,
            "jitter_ms": self.jitter_ms,
            "rate_mbps": self.rate_mbps,
            "upstream": f"{self.upstream[0]}:{self.upstream[1]}",
            "connections": self.counters.connections,
            "requests": self.counters.requests,
            "bytes_down": self.counters.bytes_down,
            "bytes_up": self.counters.bytes_up,
        }

    def _bytes_per_s(self) -> float | None:
        return None if self.rate_mbps is None else self.rate_mbps * 1e6 / 8

    def _delay_s(self) -> float:
        if self.jitter_ms:
            return self._random.uniform(self.delay_ms - self.jitter_ms, self.delay_ms + self.jitter_ms) / 1e3
        return self.delay_ms / 1e3

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._accept, self.host, self.port)
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._relay(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_writer.close()
            return
        self.counters.connections += 1
        answered = asyncio.Event()
        answered.set()

        async def requests() -> None:
            link = _Link(self._bytes_per_s())
            while chunk := await client_reader.read(_CHUNK):
                if answered.is_set():
                    answered.clear()
                    delay = self._delay_s()
                    self.counters.requests += 1
                    self.counters.delayed_ms += delay * 1e3
                    await asyncio.sleep(delay)
                await link.carry(len(chunk))
                self.counters.bytes_up += len(chunk)  # before the write: the peer may act on it at once
                upstream_writer.write(chunk)
                await upstream_writer.drain()
            if upstream_writer.can_write_eof():
                upstream_writer.write_eof()

        async def responses() -> None:
            link = _Link(self._bytes_per_s())
            while chunk := await upstream_reader.read(_CHUNK):
                answered.set()
                await link.carry(len(chunk))
                self.counters.bytes_down += len(chunk)
                client_writer.write(chunk)
                await client_writer.drain()
            if client_writer.can_write_eof():
                client_writer.write_eof()

        pumps = [asyncio.ensure_future(requests()), asyncio.ensure_future(responses())]
        try:
            # Both directions run until each has seen its end of stream; a reset on either side
            # ends the connection (the other direction is cancelled, never left behind).
            await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for writer in (client_writer, upstream_writer):
                writer.close()
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await writer.wait_closed()

    def start(self) -> LatencyProxy:
        self._thread.start()
        if not self._ready.wait(timeout=10) or self._failure is not None:
            raise RuntimeError(f"the latency proxy did not start: {self._failure}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout=10)

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
