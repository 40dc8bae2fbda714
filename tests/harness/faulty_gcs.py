"""A GCS stand-in on loopback that misbehaves on purpose, object by object.

It speaks just enough of the JSON API for downloads (`GET /storage/v1/b/{bucket}/o/{object}?alt=media`)
and for the service's start-up check of its bucket (`GET /storage/v1/b/{bucket}`: a bucket that any
script or rule names exists, and answers the same way whatever the objects' scripts say),
written on raw asyncio streams so that every byte on the wire is under the test's control: a 429
with `Retry-After`, a 503, a body that stops half-way and resets the connection, a trickle, an
object larger than the cap with or without `Content-Length`, a gzip-encoded body that inflates far
past the cap, a 403, a 404. Each object has a script, a list of steps taken one per request (the
last step repeats); a prefix rule gives every distinct name under a prefix its own fresh script,
so a long test can keep asking for "a new object that fails once". It counts requests per object
and records when each arrived, and it runs in its own thread with its own event loop, so it serves
in-process test clients and service subprocesses alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import struct
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class Serve:
    """200 with `data` as the body: already encoded when `encoding` (the `Content-Encoding`) is given,
    and chunked, without `Content-Length`, when not `sized`."""

    data: bytes
    encoding: str | None = None
    sized: bool = True


@dataclass(frozen=True)
class Status:
    """An error status with a JSON body, and `Retry-After` when given; with `endless`, the body is
    an error page that never ends (chunked), sent as fast as the client reads it."""

    status: int
    retry_after: str | None = None
    endless: bool = False


@dataclass(frozen=True)
class Reset:
    """Declare the full `Content-Length`, send half the body, then reset the connection."""

    data: bytes


@dataclass(frozen=True)
class Trickle:
    """Send the body `chunk` bytes at a time, one chunk every `interval_s`."""

    data: bytes
    chunk: int = 64
    interval_s: float = 0.05


@dataclass(frozen=True)
class Endless:
    """200 with a body that never ends (chunked, no `Content-Length`), as fast as the client reads."""

    chunk: int = 64 * 1024


Step = Serve | Status | Reset | Trickle | Endless

_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def gzip_bomb(decoded_bytes: int) -> bytes:
    """A gzip stream of zeros: about a thousandth of `decoded_bytes` on the wire."""
    return gzip.compress(b"\0" * decoded_bytes, compresslevel=9)


class FaultyGcs:
    """`with FaultyGcs() as gcs:` serves scripted objects at `gcs.url` until the block ends."""

    def __init__(self, keep_alive: bool = True) -> None:
        self.keep_alive = keep_alive
        self.url = ""
        self.port = 0
        self.requests: Counter[str] = Counter()
        """Requests per `bucket/object`."""
        self.arrivals: dict[str, list[float]] = defaultdict(list)
        """time.monotonic() of each request per `bucket/object`."""
        self.connections_open = 0
        self.endless_bytes: Counter[str] = Counter()
        """Body bytes written per `bucket/object` by the endless responses, before the client hung up."""
        self._scripts: dict[str, list[Step]] = {}
        self._rules: dict[str, tuple[Step, ...]] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    # the script

    def put(self, bucket: str, name: str, *steps: Step) -> None:
        """Script `bucket/name`: one step per request, the last one repeating."""
        with self._lock:
            self._scripts[f"{bucket}/{name}"] = list(steps)

    def rule(self, bucket: str, prefix: str, *steps: Step) -> None:
        """Every distinct object under `bucket/prefix` gets its own copy of `steps`."""
        with self._lock:
            self._rules[f"{bucket}/{prefix}"] = steps

    def count(self, bucket: str, name: str) -> int:
        with self._lock:
            return self.requests[f"{bucket}/{name}"]

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.arrivals.clear()

    def _next_step(self, key: str) -> Step | None:
        with self._lock:
            self.requests[key] += 1
            self.arrivals[key].append(time.monotonic())
            script = self._scripts.get(key)
            if script is None:
                for prefix, steps in self._rules.items():
                    if key.startswith(prefix):
                        script = self._scripts[key] = list(steps)
                        break
            if not script:
                return None
            return script.pop(0) if len(script) > 1 else script[0]

    # the server

    def __enter__(self) -> FaultyGcs:
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            self._server = loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", 0))
            self.port = self._server.sockets[0].getsockname()[1]
            self.url = f"http://127.0.0.1:{self.port}"
            started.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="faulty-gcs", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the GCS stand-in did not start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return

        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            await self._server.wait_closed()
            loop.stop()

        asyncio.run_coroutine_threadsafe(stop(), loop)
        self._thread.join(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_open += 1
        try:
            while await self._one_request(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self.connections_open -= 1
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection is to be closed."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, target, _ = request_line.split(" ", 2)
        path = urlsplit(target).path
        parts = path.split("/")
        if method == "GET" and len(parts) == 5 and parts[1:4] == ["storage", "v1", "b"]:
            return await self._bucket(writer, unquote(parts[4]))
        # ['', 'storage', 'v1', 'b', bucket, 'o', object]
        if method != "GET" or len(parts) != 7 or parts[1:4] != ["storage", "v1", "b"] or parts[5] != "o":
            await self._status(writer, 400, None)
            return self.keep_alive
        key = f"{unquote(parts[4])}/{unquote(parts[6])}"
        step = self._next_step(key)
        if step is None:
            await self._status(writer, 404, None)
            return self.keep_alive
        if isinstance(step, Status) and step.endless:
            await self._head(
                writer, step.status, {"Content-Type": "text/html", "Transfer-Encoding": "chunked"}
            )
            await self._endless(writer, key, b"<p>error</p>" * 5000)
            return False
        if isinstance(step, Status):
            await self._status(writer, step.status, step.retry_after)
            return self.keep_alive
        if isinstance(step, Serve):
            body = step.data
            headers = {"Content-Type": "image/jpeg"}
            if step.encoding:
                headers["Content-Encoding"] = step.encoding
            if step.sized:
                headers["Content-Length"] = str(len(body))
                await self._head(writer, 200, headers)
                writer.write(body)
            else:
                headers["Transfer-Encoding"] = "chunked"
                await self._head(writer, 200, headers)
                for start in range(0, len(body), 64 * 1024):
                    piece = body[start : start + 64 * 1024]
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            await writer.drain()
            return self.keep_alive
        if isinstance(step, Reset):
            await self._head(writer, 200, {"Content-Length": str(len(step.data))})
            writer.write(step.data[: len(step.data) // 2])
            await writer.drain()
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if isinstance(step, Trickle):
            await self._head(writer, 200, {"Content-Length": str(len(step.data))})
            for start in range(0, len(step.data), step.chunk):
                writer.write(step.data[start : start + step.chunk])
                await writer.drain()
                await asyncio.sleep(step.interval_s)
            return self.keep_alive
        await self._head(writer, 200, {"Transfer-Encoding": "chunked"})
        await self._endless(writer, key, b"\0" * step.chunk)
        return False

    async def _bucket(self, writer: asyncio.StreamWriter, bucket: str) -> bool:
        """The bucket's metadata, or 404 when no script or rule names it."""
        with self._lock:
            known = any(key.split("/", 1)[0] == bucket for key in (*self._scripts, *self._rules))
        if not known:
            await self._status(writer, 404, None)
            return self.keep_alive
        body = json.dumps({"kind": "storage#bucket", "name": bucket, "id": bucket}).encode()
        await self._head(writer, 200, {"Content-Type": "application/json", "Content-Length": str(len(body))})
        writer.write(body)
        await writer.drain()
        return self.keep_alive

    async def _endless(self, writer: asyncio.StreamWriter, key: str, piece: bytes) -> None:
        """Chunks of `piece` until the client hangs up (which ends the connection)."""
        while True:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            with self._lock:
                self.endless_bytes[key] += len(piece)

    async def _head(self, writer: asyncio.StreamWriter, status: int, headers: dict[str, str]) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        if not self.keep_alive:
            headers = {**headers, "Connection": "close"}
        lines += [f"{name}: {value}" for name, value in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    async def _status(self, writer: asyncio.StreamWriter, status: int, retry_after: str | None) -> None:
        body = json.dumps({"error": {"code": status, "message": _REASONS.get(status, "error")}}).encode()
        headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        await self._head(writer, status, headers)
        writer.write(body)
        await writer.drain()


def trickled(data: bytes, seconds: float) -> Trickle:
    """`data` delivered in 20 pieces over about `seconds`: a download slower than any grace period."""
    pieces = 20
    return Trickle(data, chunk=len(data) // pieces + 1, interval_s=seconds / pieces)


def service_env(gcs: FaultyGcs, bucket: str, **extra: str) -> dict[str, str]:
    """The environment of a `cliplens serve` that reads `bucket` from this stand-in."""
    return {
        "CLIPLENS_DEFAULT_BUCKET": bucket,
        "CLIPLENS_ALLOWED_BUCKETS": bucket,
        "STORAGE_EMULATOR_HOST": gcs.url,
        "CLIPLENS_ALLOW_EMULATOR": "1",
        # the stand-in serves downloads only (no object metadata), and the tests count them
        "CLIPLENS_CACHE_BYTES": "0",
        **extra,
    }
