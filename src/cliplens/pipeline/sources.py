"""Image sources: a reference in, the image's encoded bytes out (the `load` stage).

Four sources: Google Cloud Storage through gcloud-aio-storage (one HTTP session for the life of
the app, never one per request), a local directory (the embedded default: the service runs with no
cloud at all), http(s) URLs on allowed hosts, fetched under the SSRF rules of pipeline/urls.py (off
unless `CLIPLENS_URL_HOSTS` is set; a session of their own), and bytes that came inline with the
request (a large data: URI is decoded here, in a worker thread, so that tens of megabytes of base64
never hold the event loop). Every failure becomes an ItemError with the vocabulary's code; nothing
here knows about HTTP responses of the API.

A source also says *which* bytes it read (`Content.identity`) and can tell which bytes a reference
names now without reading them (`identify`): a GCS object's generation, a file's inode, size and
mtime. The embedding cache keys on that (pipeline/cache.py); inline bytes and URLs have no
identity but their bytes (a URL's answer can change at any time, and no header says it did).

What a source asks of storage is recorded, for the traces, in the `calls` list the caller passes
(the item's `StageTiming.calls`): one `ClientCall` per HTTP attempt (retries included) and per file
read, plain data that telemetry/stages.py turns into child spans of the stage span. Nothing here
holds a tracer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import yarl
from gcloud.aio.storage import Storage
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential,
    wait_random,
)

from cliplens.pipeline.references import (
    DataUriReference,
    GcsReference,
    InlineReference,
    LocalReference,
    Reference,
    RefusedReference,
    UrlReference,
    validate_bucket,
    validate_object_name,
)
from cliplens.pipeline.urls import (
    MAX_REDIRECTS,
    PinnedResolver,
    Resolve,
    Target,
    UrlPolicy,
    pinned,
    redacted,
    resolve_host,
)
from cliplens.telemetry.stages import ClientCall
from cliplens.vocabulary import ErrorCode, ItemError, Source

log = logging.getLogger(__name__)
_R = TypeVar("_R")

Identity = tuple[str | int, ...]
"""Which exact bytes a reference named when it was read: ("gcs", bucket, name, generation) or
("local", path, device, inode, size, mtime_ns)."""


@dataclass(frozen=True, slots=True)
class Content:
    """The bytes of one image and, where storage can tell, their identity (None for inline bytes)."""

    data: bytes
    identity: Identity | None = None


_CHUNK = 256 * 1024
PUBLIC_API_ROOT = "https://www.googleapis.com"
_BACKOFF = wait_exponential(multiplier=0.1, max=2.0) + wait_random(0, 0.1)
"""0.1 s, 0.2 s, 0.4 s ... up to 2 s, plus up to 0.1 s of jitter, so retries from many items spread out."""


class LocalDirectorySource:
    """Files under one root directory; a name can never reach outside it, symlinks included."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root.resolve()
        self.max_bytes = max_bytes

    def resolve(self, name: str) -> Path:
        """The file a name refers to, or ItemError if the name tries to leave the root."""
        if "\x00" in name:
            raise ItemError(ErrorCode.INVALID_REFERENCE, "the name contains a NUL byte")
        relative = Path(name)
        if relative.is_absolute() or name.startswith(("/", "\\")):
            raise ItemError(ErrorCode.FORBIDDEN, "absolute paths are not allowed")
        if ".." in relative.parts or "\\" in name:
            raise ItemError(ErrorCode.FORBIDDEN, "the name may not leave the image directory")
        try:
            path = (self.root / relative).resolve()
        except (OSError, RuntimeError):
            # RuntimeError: a symlink loop (Python < 3.13 raises it from resolve)
            raise ItemError(ErrorCode.NOT_FOUND, f"{name!r} does not resolve to a file") from None
        if not path.is_relative_to(self.root):
            raise ItemError(ErrorCode.FORBIDDEN, "the name resolves outside the image directory")
        return path

    def identify(self, name: str) -> Identity:
        """The identity of the file `name` is now, without reading it (blocking: off the event loop)."""
        path = self.resolve(name)
        try:
            status = os.stat(path)
        except PermissionError:
            raise ItemError(ErrorCode.FORBIDDEN, f"{name!r} is not readable") from None
        except OSError:
            raise ItemError(ErrorCode.NOT_FOUND, f"{name!r} does not exist") from None
        if not stat.S_ISREG(status.st_mode):
            raise ItemError(ErrorCode.NOT_FOUND, f"{name!r} is not a regular file")
        return _file_identity(path, status)

    def load(self, name: str, calls: list[ClientCall] | None = None) -> Content:
        """Read the file and the identity of what was read (blocking: call it off the event loop);
        the read is recorded in `calls`."""
        call = ClientCall.file_read()
        if calls is not None:
            calls.append(call)
        try:
            return self._read(name, call)
        except BaseException as exc:
            call.fail(exc)
            raise
        finally:
            call.end()

    def _read(self, name: str, call: ClientCall) -> Content:
        """Only a regular file is read: opened without blocking (a FIFO would otherwise hang the
        thread for good) and without following a symlink swapped in after `resolve`."""
        path = self.resolve(name)
        flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except PermissionError:
            raise ItemError(ErrorCode.FORBIDDEN, f"{name!r} is not readable") from None
        except OSError:
            # missing, a path through a file (ENOTDIR), too long, a symlink loop (ELOOP)
            raise ItemError(ErrorCode.NOT_FOUND, f"{name!r} does not exist") from None
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise ItemError(ErrorCode.NOT_FOUND, f"{name!r} is not a regular file")
            if status.st_size > self.max_bytes:
                raise ItemError(ErrorCode.TOO_LARGE, f"the file is larger than {self.max_bytes} bytes")
            with os.fdopen(fd, "rb", closefd=False) as handle:
                # the size stat'ed plus one byte, not the cap: a read of the cap allocates it (64 MiB
                # by default, fresh pages every time), ~1 ms of CPU per 12 MP photo; the extra byte
                # tells a file still growing, whose rest is read up to the cap
                data = handle.read(status.st_size + 1)
                if len(data) > status.st_size:
                    data += handle.read(self.max_bytes + 1 - len(data))
            call.received(len(data))
        finally:
            os.close(fd)
        if len(data) > self.max_bytes:
            raise ItemError(ErrorCode.TOO_LARGE, f"the file is larger than {self.max_bytes} bytes")
        return Content(data, _file_identity(path, status))


def _file_identity(path: Path, status: os.stat_result) -> Identity:
    """A rewrite in place changes the size or mtime; a replacement (rename over) the inode."""
    return ("local", str(path), status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)


class _Transient(ItemError):
    """A failure worth retrying (429, 5xx, a broken or timed-out connection)."""

    def __init__(
        self, code: ErrorCode, message: str, reason: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(code, message)
        self.reason = reason
        self.retry_after_s = retry_after_s


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    value = (headers or {}).get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


_ERROR_BODY_BYTES = 16 * 1024
"""The most of an error response's body read (for its message); the rest is never downloaded."""


class _BoundedErrorBodies:
    """The session gcloud-aio downloads through, which reads at most a little of an error's body.

    gcloud-aio reads the whole body of an error response into memory to put it in the exception's
    message, before any byte cap of ours applies: a storage endpoint (or a proxy in front of it)
    answering 5xx with an endless body would be buffered for as long as the download timeout.
    Here the error is raised from the first `_ERROR_BODY_BYTES`, and the connection is closed.
    One is made per attempt: it is where the request's URL and status are seen, for `call`.
    """

    def __init__(self, session: aiohttp.ClientSession, call: ClientCall) -> None:
        self._session = session
        self._call = call

    async def get(self, url: str, **kwargs: Any) -> aiohttp.ClientResponse:
        self._call.sent(url)  # gcloud-aio passes the query apart, as `params`
        response = await self._session.get(url, **kwargs)
        self._call.answered(response.status)
        if response.status < 400:
            return response
        try:
            body = await response.content.read(_ERROR_BODY_BYTES)
        finally:
            response.close()
        raise aiohttp.ClientResponseError(
            response.request_info,
            response.history,
            status=response.status,
            message=f"{response.reason}: {body.decode('utf-8', 'replace')}",
            headers=response.headers,
        )


class GcsSource:
    """Objects in GCS buckets, streamed through one shared aiohttp session, stopped at the byte cap.

    gcloud-aio does not retry downloads: here 429, 5xx and connection failures are retried with
    jittered exponential backoff (honouring Retry-After), within the request's deadline; 404 and
    403 never are. The API root is always passed explicitly, so an `STORAGE_EMULATOR_HOST` in the
    environment can never silently redirect (and de-authenticate) the client.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        max_bytes: int,
        emulator_host: str | None = None,
        timeout_s: float = 30.0,
        retries: int = 3,
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        if emulator_host is None:
            self.storage = Storage(session=session, api_root=PUBLIC_API_ROOT, api_is_dev=False)  # type: ignore[arg-type]
        else:
            root = emulator_host if "://" in emulator_host else f"http://{emulator_host}"
            self.storage = Storage(session=session, api_root=root, api_is_dev=True)  # type: ignore[arg-type]
        self.session = session
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.retries = retries
        self.on_retry = on_retry

    async def load(
        self, reference: GcsReference, deadline: float | None = None, calls: list[ClientCall] | None = None
    ) -> Content:
        """The object's bytes and generation; `deadline` (time.monotonic) bounds every attempt and
        every backoff; each attempt is recorded in `calls`."""
        return await self._retrying(reference, deadline, self._read_once, calls)

    async def identify(
        self, reference: GcsReference, deadline: float | None = None, calls: list[ClientCall] | None = None
    ) -> Identity | None:
        """The object's current generation, from its metadata (a few hundred bytes, not the object):
        an overwrite makes a new one, a deleted object is `not_found`. None when the answer names
        no generation (a storage stand-in that serves downloads only): the object is then loaded."""
        return await self._retrying(reference, deadline, self._generation_once, calls)

    async def _retrying(
        self,
        reference: GcsReference,
        deadline: float | None,
        once: Callable[[GcsReference, float, ClientCall], Awaitable[_R]],
        calls: list[ClientCall] | None,
    ) -> _R:
        """`once(reference, timeout_s, call)`, retried as the class docstring says (`_retrying`),
        each attempt one call in `calls`.

        The names are validated again here, whoever built the reference: gcloud-aio puts the bucket
        into the URL unescaped, so a bucket with `/`, `?` or `#` would read another object.
        """
        validate_bucket(reference.bucket)
        validate_object_name(reference.name)

        async def attempt(timeout_s: float, resend_count: int, attempts: list[ClientCall]) -> _R:
            call = ClientCall.http("GET", resend_count=resend_count)
            attempts.append(call)
            try:
                return await once(reference, timeout_s, call)
            except BaseException as exc:
                call.fail(exc)
                raise
            finally:
                call.end()

        timeout_s, retries = self.timeout_s, self.retries
        return await _retrying(reference, deadline, calls, attempt, timeout_s, retries, self.on_retry)

    async def _generation_once(
        self, reference: GcsReference, timeout_s: float, call: ClientCall
    ) -> Identity | None:
        with _storage_errors(reference, timeout_s, call):
            try:
                metadata = await self.storage.download_metadata(
                    reference.bucket,
                    reference.name,
                    timeout=timeout_s,  # type: ignore[arg-type]
                    session=_BoundedErrorBodies(self.session, call),  # type: ignore[arg-type]
                )
            except ValueError:  # not JSON
                return None
        generation = str(metadata.get("generation", "")) if isinstance(metadata, dict) else ""
        if not generation.isdigit():
            return None
        return ("gcs", reference.bucket, reference.name, int(generation))

    async def _read_once(self, reference: GcsReference, timeout_s: float, call: ClientCall) -> Content:
        with _storage_errors(reference, timeout_s, call):
            stream = await self.storage.download_stream(
                reference.bucket,
                reference.name,
                timeout=timeout_s,  # type: ignore[arg-type]
                session=_BoundedErrorBodies(self.session, call),  # type: ignore[arg-type]
            )
            async with stream as response:
                if stream.content_length > self.max_bytes:
                    raise ItemError(ErrorCode.TOO_LARGE, f"the object is larger than {self.max_bytes} bytes")
                # the body's size on the wire: what was read, unless it came compressed
                plain = response.headers.get("Content-Encoding", "identity").lower() == "identity"
                chunks: list[bytes] = []
                received = 0
                try:
                    while chunk := await stream.read(_CHUNK):
                        received += len(chunk)
                        if received > self.max_bytes:
                            raise ItemError(
                                ErrorCode.TOO_LARGE,
                                f"the object is larger than {self.max_bytes} bytes (decoded)",
                            )
                        chunks.append(chunk)
                finally:
                    if plain:
                        call.received(received)
                if not plain and stream.content_length:
                    call.received(stream.content_length)
                generation = response.headers.get("x-goog-generation", "")
        if not generation.isdigit():  # every GCS download carries it; without it, no identity
            return Content(b"".join(chunks))
        return Content(b"".join(chunks), ("gcs", reference.bucket, reference.name, int(generation)))


@contextlib.contextmanager
def _storage_errors(reference: object, timeout_s: float, call: ClientCall) -> Iterator[None]:
    """Storage's answers and failures as the vocabulary's errors (`_Transient` where worth a retry);
    what failed, before it is translated, on `call` (a status answered is already there)."""
    try:
        yield
    except aiohttp.ClientResponseError as exc:
        call.fail(str(exc.status))
        raise _from_status(exc.status, reference, _retry_after(exc.headers)) from None
    except TimeoutError as exc:
        call.fail(exc)
        raise _Transient(
            ErrorCode.TIMEOUT, f"downloading {reference} took longer than {timeout_s:.1f} s", "timeout"
        ) from None
    except aiohttp.ClientConnectorCertificateError as exc:
        # a certificate refused stays refused: no retry (a handshake cut short is retried below)
        call.fail(exc)
        reason = getattr(exc.certificate_error, "verify_message", None) or exc.certificate_error
        raise ItemError(
            ErrorCode.STORAGE_UNAVAILABLE,
            f"no TLS connection for {reference}: the server's TLS certificate was refused ({reason})",
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        call.fail(exc)
        raise _Transient(
            ErrorCode.STORAGE_UNAVAILABLE,
            f"storage did not answer for {reference}: {type(exc).__name__}",
            "connection",
        ) from None


async def _retrying(
    what: object,
    deadline: float | None,
    calls: list[ClientCall] | None,
    attempt: Callable[[float, int, list[ClientCall]], Awaitable[_R]],
    timeout_s: float,
    retries: int,
    on_retry: Callable[[str], None] | None,
) -> _R:
    """`attempt(timeout_s, resend_count, calls)`, retried after a `_Transient` failure with jittered
    exponential backoff (or Retry-After, when longer), at most `retries` times, within `deadline`
    (time.monotonic; else `timeout_s` per attempt and retry). Each attempt records its calls in
    `calls`; the last one recorded before a retry gets the reason and the backoff chosen, and
    `on_retry` the reason. The last transient failure becomes `timeout` or `storage_unavailable`.
    """
    budget = timeout_s * (retries + 1) if deadline is None else deadline - time.monotonic()

    def wait(state: RetryCallState) -> float:
        backoff = _BACKOFF(state)
        exc = state.outcome.exception() if state.outcome else None
        hinted = exc.retry_after_s if isinstance(exc, _Transient) else None
        return max(backoff, hinted or 0.0)

    attempts: list[ClientCall] = [] if calls is None else calls

    def count(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if not isinstance(exc, _Transient):
            return
        if on_retry is not None:
            on_retry(exc.reason)
        if attempts and state.next_action is not None:
            attempts[-1].retried(exc.reason, state.next_action.sleep)

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(_Transient),
        stop=stop_after_attempt(retries + 1) | stop_before_delay(max(budget, 0.0)),
        wait=wait,
        before_sleep=count,
        reraise=True,
    )
    try:
        async for try_ in retrying:
            with try_:
                remaining = timeout_s if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    raise ItemError(ErrorCode.TIMEOUT, f"no time left to download {what}")
                return await attempt(min(timeout_s, remaining), try_.retry_state.attempt_number - 1, attempts)
    except _Transient as exc:
        code = ErrorCode.TIMEOUT if exc.reason == "timeout" else ErrorCode.STORAGE_UNAVAILABLE
        raise ItemError(code, exc.message) from None
    raise AssertionError("unreachable: tenacity re-raises the last error")


def _from_status(status: int, reference: object, retry_after_s: float | None) -> ItemError:
    if status == 404:
        return ItemError(ErrorCode.NOT_FOUND, f"{reference} does not exist")
    if status in (401, 403):
        return ItemError(ErrorCode.FORBIDDEN, f"access to {reference} was refused (HTTP {status})")
    if status == 400:
        return ItemError(ErrorCode.INVALID_REFERENCE, f"storage refused the name {reference} (HTTP 400)")
    message = f"storage answered HTTP {status} for {reference}"
    if status == 429:
        return _Transient(ErrorCode.STORAGE_UNAVAILABLE, message, "http_429", retry_after_s)
    if status >= 500:
        return _Transient(ErrorCode.STORAGE_UNAVAILABLE, message, "http_5xx", retry_after_s)
    return ItemError(ErrorCode.STORAGE_UNAVAILABLE, message)


_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_NO_SUCH_HOST = frozenset(
    code
    for code in (getattr(socket, name, None) for name in ("EAI_NONAME", "EAI_NODATA"))
    if code is not None
)


class UrlSource:
    """Images at http(s) URLs, under the rules of pipeline/urls.py, through a session of their own.

    Each hop (the URL, then each redirect, at most `MAX_REDIRECTS`) is checked before it connects:
    the URL against the policy, then every address its host resolves to (`resolve`, a parameter so
    that tests can make a name resolve anywhere); the connection goes to those addresses only
    (`PinnedResolver`). The body is read up to the byte cap (a larger Content-Length is refused
    before reading), asked for and accepted only uncompressed (a compressed body could expand past
    the cap before it is counted). Failures are retried like GCS downloads (`_retrying`): 429, 5xx,
    broken connections and timeouts; 404 and 410 are `not_found`, 401 and 403 `forbidden`. Each hop
    is a `GET` call in `calls`, its URL without the query (a signed URL's query is a credential).
    No cookie is kept and no proxy from the environment is used.
    """

    def __init__(
        self,
        policy: UrlPolicy,
        max_bytes: int,
        timeout_s: float = 30.0,
        retries: int = 3,
        on_retry: Callable[[str], None] | None = None,
        resolve: Resolve = resolve_host,
        connections: int = 32,
    ) -> None:
        self.policy = policy
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.retries = retries
        self.on_retry = on_retry
        self.resolve = resolve
        """(host, port) -> addresses; the addresses checked and connected to are these."""
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=connections, resolver=PinnedResolver(), use_dns_cache=False),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            headers={"Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": "cliplens"},
        )

    async def close(self) -> None:
        await self.session.close()

    async def load(
        self, reference: UrlReference, deadline: float | None = None, calls: list[ClientCall] | None = None
    ) -> Content:
        """The image's bytes (no identity); `deadline` (time.monotonic) bounds every attempt, its
        redirects included, and every backoff; each hop of each attempt is recorded in `calls`."""

        async def attempt(timeout_s: float, resend_count: int, attempts: list[ClientCall]) -> Content:
            return await self._fetch_once(reference, timeout_s, resend_count, attempts)

        timeout_s, retries = self.timeout_s, self.retries
        return await _retrying(reference, deadline, calls, attempt, timeout_s, retries, self.on_retry)

    async def _fetch_once(
        self, reference: UrlReference, timeout_s: float, resend_count: int, calls: list[ClientCall]
    ) -> Content:
        ends = time.monotonic() + timeout_s
        url = reference.url
        for _ in range(MAX_REDIRECTS + 1):
            target = self.policy.check(url)
            addresses = await self._addresses(target, ends)
            call = ClientCall.http("GET", resend_count=resend_count)
            calls.append(call)
            try:
                with _storage_errors(reference, timeout_s, call), pinned(target.host, addresses):
                    call.sent(redacted(target.url))
                    left = max(ends - time.monotonic(), 0.001)
                    async with self.session.get(
                        target.url, allow_redirects=False, timeout=aiohttp.ClientTimeout(total=left)
                    ) as response:
                        call.answered(response.status)
                        if response.status in _REDIRECTS:
                            url = _redirect_target(target.url, response.headers.get("Location"))
                            continue
                        if response.status >= 300:
                            status = 404 if response.status == 410 else response.status  # gone: not found
                            raise _from_status(status, reference, _retry_after(response.headers))
                        return Content(await self._body(response, call))
            except BaseException as exc:
                call.fail(exc)
                raise
            finally:
                call.end()
        raise ItemError(ErrorCode.INVALID_REFERENCE, f"{reference} redirects more than {MAX_REDIRECTS} times")

    async def _addresses(self, target: Target, ends: float) -> tuple[str, ...]:
        """The policy's checked addresses for the hop; a failed lookup is `not_found` (no such
        name) or a transient failure (no answer in time, or a resolver error)."""
        host = target.host
        try:
            async with asyncio.timeout(max(ends - time.monotonic(), 0.0)):
                return await self.policy.addresses(target, self.resolve)
        except TimeoutError:
            raise _Transient(ErrorCode.TIMEOUT, f"looking up {host} took too long", "timeout") from None
        except socket.gaierror as exc:
            if exc.errno in _NO_SUCH_HOST:
                raise ItemError(ErrorCode.NOT_FOUND, f"no such host: {host}") from None
            raise _Transient(
                ErrorCode.STORAGE_UNAVAILABLE, f"looking up {host} failed: {exc}", "connection"
            ) from None
        except OSError as exc:
            raise _Transient(
                ErrorCode.STORAGE_UNAVAILABLE, f"looking up {host} failed: {type(exc).__name__}", "connection"
            ) from None

    async def _body(self, response: aiohttp.ClientResponse, call: ClientCall) -> bytes:
        """The body, at most `max_bytes` of it, uncompressed only."""
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ItemError(
                ErrorCode.UNSUPPORTED_FORMAT,
                f"the server sent the image {encoding}-encoded; only an uncompressed body is accepted",
            )
        if response.content_length is not None and response.content_length > self.max_bytes:
            raise ItemError(ErrorCode.TOO_LARGE, f"the image is larger than {self.max_bytes} bytes")
        chunks: list[bytes] = []
        received = 0
        try:
            while chunk := await response.content.read(_CHUNK):
                received += len(chunk)
                if received > self.max_bytes:
                    raise ItemError(ErrorCode.TOO_LARGE, f"the image is larger than {self.max_bytes} bytes")
                chunks.append(chunk)
        finally:
            call.received(received)
        return b"".join(chunks)


def _redirect_target(current: yarl.URL, location: str | None) -> yarl.URL:
    """Where a redirect points, relative to the URL that answered it; checked by the next hop."""
    if not location:
        raise ItemError(ErrorCode.INVALID_REFERENCE, f"{redacted(current)} redirects without a Location")
    try:
        return current.join(yarl.URL(location))
    except (ValueError, TypeError, UnicodeError):
        raise ItemError(
            ErrorCode.INVALID_REFERENCE, f"{redacted(current)} redirects to an unparseable Location"
        ) from None


class ImageSources:
    """Routes each reference to the source that holds it."""

    def __init__(
        self,
        local: LocalDirectorySource | None,
        gcs: GcsSource | None,
        max_bytes: int,
        url: UrlSource | None = None,
    ) -> None:
        self.local = local
        self.gcs = gcs
        self.url = url
        self.max_bytes = max_bytes
        self.base64_lane = asyncio.Semaphore(1)
        """Large data: URIs are decoded one at a time: binascii holds the GIL, so two decoding at
        once are no faster, and every other thread decoding is one more the event loop must win
        the GIL from (four at once held it for ~140 ms stretches, one at a time for a few ms)."""

    def needs_slot(self, reference: Reference) -> bool:
        """Whether reading the reference is I/O that must wait for a download slot."""
        return isinstance(reference, (GcsReference, LocalReference, UrlReference))

    def identifies(self, reference: Reference) -> bool:
        """Whether storage can tell which bytes the reference names without reading them (a URL
        cannot: its bytes are loaded, then hashed, like inline bytes)."""
        return isinstance(reference, (GcsReference, LocalReference))

    @staticmethod
    def source_of(reference: Reference) -> Source:
        """Where the reference's bytes come from (the `source` of its load event)."""
        if isinstance(reference, GcsReference):
            return Source.GCS
        if isinstance(reference, LocalReference):
            return Source.LOCAL
        if isinstance(reference, UrlReference):
            return Source.URL
        return Source.INLINE

    async def identify(
        self,
        reference: GcsReference | LocalReference,
        deadline: float | None = None,
        calls: list[ClientCall] | None = None,
    ) -> Identity | None:
        """Which bytes the reference names now (GCS: a metadata request, recorded in `calls`; local:
        a stat, not recorded); None when storage cannot say."""
        if isinstance(reference, LocalReference):
            return await asyncio.to_thread(self._local().identify, reference.name)
        return await self._gcs().identify(reference, deadline, calls)

    async def load(
        self, reference: Reference, deadline: float | None = None, calls: list[ClientCall] | None = None
    ) -> Content:
        """The reference's bytes; what is asked of storage (downloads, file reads) is recorded in
        `calls`, bytes already in memory (inline, data: URIs) are not."""
        if isinstance(reference, RefusedReference):
            raise ItemError(reference.code, reference.message)
        if isinstance(reference, DataUriReference):
            async with self.base64_lane:
                return Content(await asyncio.to_thread(reference.decode))  # tens of MB: off the event loop
        if isinstance(reference, InlineReference):
            if len(reference.data) > self.max_bytes:
                raise ItemError(ErrorCode.TOO_LARGE, f"the image is larger than {self.max_bytes} bytes")
            return Content(reference.data)
        if isinstance(reference, LocalReference):
            return await asyncio.to_thread(self._local().load, reference.name, calls)
        if isinstance(reference, UrlReference):
            return await self._url().load(reference, deadline, calls)
        return await self._gcs().load(reference, deadline, calls)

    async def close(self) -> None:
        """Close the URL source's session (the GCS session belongs to the service)."""
        if self.url is not None:
            await self.url.close()

    def _local(self) -> LocalDirectorySource:
        if self.local is None:
            raise ItemError(ErrorCode.INVALID_REFERENCE, "no local image directory is configured")
        return self.local

    def _url(self) -> UrlSource:
        if self.url is None:
            raise ItemError(ErrorCode.FORBIDDEN, "image URLs are off in this service (CLIPLENS_URL_HOSTS)")
        return self.url

    def _gcs(self) -> GcsSource:
        if self.gcs is None:
            raise ItemError(ErrorCode.STORAGE_UNAVAILABLE, "GCS is not configured in this service")
        return self.gcs
