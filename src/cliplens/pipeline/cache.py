"""The embedding cache: a vector already made is never made again.

Keys cannot go stale, because they name exact bytes and an exact model:

    cliplens:v2:<model fingerprint>:<SHA-256 of the content identity>

- The model fingerprint (`model_fingerprint`): cliplens's vector format, the runtime, the device
  type, the dtype, the architecture, the preprocessing, the decode path and a digest of the
  weights as served. Change any of them and no old vector can be found.
- The content identity (`content_key`): a GCS object with its generation (an overwrite makes a
  new generation; a deleted object fails its metadata lookup with `not_found` before any cache
  is read), a local file with its device, inode, size and mtime in nanoseconds, inline bytes
  (data: URIs, uploads) by their SHA-256 (which saves the decode and the model, not the load),
  a text by its token ids.

Two tiers. The in-process tier (`MemoryTier`) is an LRU bounded in bytes (`CLIPLENS_CACHE_BYTES`).
The shared tier (`SharedTier`) is Redis or Valkey (`CLIPLENS_CACHE_URL`), so that replicas behind
one address share what any of them made. A lookup tries memory, then the shared tier (a shared hit
is copied into memory); a write goes to both, the shared one in the background, so no request
waits for it.

The shared tier may never fail or noticeably slow a request: each operation has a short timeout
(`CLIPLENS_CACHE_TIMEOUT_MS`), the connection pool is bounded (an operation that finds no free
connection within the timeout gives up), redis-py's own retries are off, and a circuit breaker
stops calling the tier after `BREAKER_FAILURES` failures in a row, for `BREAKER_COOLDOWN_S`,
then lets one call through to try it again. A failed or skipped operation is a miss to the caller
and a count in `cliplens_cache_requests_total{tier,result}` (error, bypass).

Vectors are the model's raw projections (normalised at the answer, unless the request asks for
the raw one), stored as little-endian float32 bytes (2 KiB for 512 dimensions): exact, so a hit
returns the very vector the miss returned.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from cliplens.pipeline.model import LoadedModel
from cliplens.settings import Settings
from cliplens.telemetry.metrics import Metrics

log = logging.getLogger(__name__)

VECTOR_FORMAT = 2
"""Raise it when what a cached vector means changes (its normalisation, its encoding): every old
key is then unreachable at once. 2: the raw projection (the API normalises), where 1 was unit length."""
BREAKER_FAILURES = 5
"""Failures in a row of the shared tier after which it is bypassed for `BREAKER_COOLDOWN_S`."""
BREAKER_COOLDOWN_S = 5.0
MAX_PENDING_WRITES = 256
"""Shared-tier writes under way at most; more are skipped (counted as `bypass`), so a slow cache
server cannot make background writes pile up in memory."""
_ENTRY_OVERHEAD_BYTES = 100
"""An OrderedDict entry's own share of memory (its hash slot and links), besides its key and value."""


def model_fingerprint(model: LoadedModel, settings: Settings) -> str:
    """What a vector is a function of, besides the content: see the module docstring."""
    digest = hashlib.sha256()
    parts = (
        f"format={VECTOR_FORMAT}",
        f"runtime={model.runtime}",
        f"device={model.device.type}",
        f"dtype={model.dtype_name}",
        f"quantized={model.describe().get('quantized', '')}",
        f"architecture={model.architecture}",
        f"preprocess={model.preprocess!r}",
        f"gpu_decode={settings.gpu_decode and model.device.type == 'cuda'}",
        f"weights={model.weights_digest()}",
    )
    for part in parts:
        digest.update(part.encode() + b"\n")
    return digest.hexdigest()


def content_key(*identity: str | int | bytes) -> bytes:
    """The digest of one content identity, whose first part names its kind ("gcs", "local",
    "bytes", "text"). Hashing large inline bytes takes milliseconds: call it off the event loop."""
    digest = hashlib.sha256()
    for part in identity:
        encoded = part if isinstance(part, bytes) else str(part).encode()
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.digest()


class CircuitBreaker:
    """Closed until `failures` calls in a row fail; then open (calls are refused) for `cooldown_s`;
    then one trial call is let through: its success closes the circuit, its failure opens it again."""

    def __init__(
        self,
        failures: int,
        cooldown_s: float,
        on_change: Callable[[bool], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures = failures
        self.cooldown_s = cooldown_s
        self._on_change = on_change
        self._clock = clock
        self._failed = 0
        self._opened_at: float | None = None
        self._trial = False

    @property
    def is_open(self) -> bool:
        return self._opened_at is not None

    def allow(self) -> bool:
        if self._opened_at is None:
            return True
        if self._trial or self._clock() - self._opened_at < self.cooldown_s:
            return False
        self._trial = True
        return True

    def succeeded(self) -> None:
        self._failed = 0
        self._trial = False
        if self._opened_at is not None:
            self._opened_at = None
            self._on_change(False)

    def failed(self) -> None:
        self._failed += 1
        was_open = self._opened_at is not None
        if was_open or self._failed >= self.failures:
            self._trial = False
            self._opened_at = self._clock()
            if not was_open:
                self._on_change(True)


class MemoryTier:
    """An LRU of encoded vectors whose keys, values and entries together stay within `capacity`."""

    def __init__(self, capacity: int, metrics: Metrics) -> None:
        self.capacity = capacity
        self.size = 0
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._metrics = metrics

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> bytes | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: bytes) -> None:
        cost = _cost(key, value)
        if cost > self.capacity:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.size -= _cost(key, old)
        while self._entries and self.size + cost > self.capacity:
            evicted, evicted_value = self._entries.popitem(last=False)
            self.size -= _cost(evicted, evicted_value)
        self._entries[key] = value
        self.size += cost
        self._metrics.cache_bytes.set(self.size)
        self._metrics.cache_entries.set(len(self._entries))


def _cost(key: str, value: bytes) -> int:
    return sys.getsizeof(key) + sys.getsizeof(value) + _ENTRY_OVERHEAD_BYTES


class SharedTier:
    """Redis or Valkey, behind a bounded pool, short timeouts and a circuit breaker."""

    tier = "redis"

    def __init__(self, url: str, timeout_s: float, connections: int, ttl_s: int, metrics: Metrics) -> None:
        self.timeout_s = timeout_s
        self.ttl_s = ttl_s
        self._metrics = metrics
        self._pool = BlockingConnectionPool.from_url(
            url,
            max_connections=connections,
            timeout=timeout_s,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )
        self._client = Redis(connection_pool=self._pool)
        self.breaker = CircuitBreaker(BREAKER_FAILURES, BREAKER_COOLDOWN_S, self._circuit_changed)
        self._writes: set[asyncio.Task[None]] = set()

    def _circuit_changed(self, is_open: bool) -> None:
        self._metrics.cache_circuit_open.labels(self.tier).set(int(is_open))
        if is_open:
            log.warning(
                "shared cache bypassed: it failed %d times in a row; next try in %.0f s",
                BREAKER_FAILURES,
                BREAKER_COOLDOWN_S,
            )
        else:
            log.info("shared cache answering again")

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The values of `keys` (None where missing); all None, counted, when the tier fails."""
        lookups = self._metrics.cache_requests_total
        if not self.breaker.allow():
            lookups.labels(self.tier, "bypass").inc(len(keys))
            return [None] * len(keys)
        started = time.perf_counter()
        try:
            answer = await asyncio.wait_for(self._client.mget(keys), self.timeout_s)
        except Exception as exc:  # whatever the cache does, the request goes on
            self.breaker.failed()
            lookups.labels(self.tier, "error").inc(len(keys))
            log.debug("shared cache lookup failed: %s", type(exc).__name__)
            return [None] * len(keys)
        finally:
            self._metrics.cache_seconds.labels(self.tier).observe(time.perf_counter() - started)
        self.breaker.succeeded()
        values = [value if isinstance(value, bytes) else None for value in answer]
        hits = sum(value is not None for value in values)
        lookups.labels(self.tier, "hit").inc(hits)
        lookups.labels(self.tier, "miss").inc(len(keys) - hits)
        return values

    def put_later(self, items: Sequence[tuple[str, bytes]]) -> None:
        """Write in the background; the caller never waits, a failure is only counted."""
        if len(self._writes) >= MAX_PENDING_WRITES or not self.breaker.allow():
            self._metrics.cache_writes_total.labels(self.tier, "bypass").inc(len(items))
            return
        task = asyncio.get_running_loop().create_task(self._put(items))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, items: Sequence[tuple[str, bytes]]) -> None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, value in items:
                    pipe.set(key, value, ex=self.ttl_s or None)
                await asyncio.wait_for(pipe.execute(), self.timeout_s)
        except Exception as exc:  # a failed write costs a future miss, nothing more
            self.breaker.failed()
            self._metrics.cache_writes_total.labels(self.tier, "error").inc(len(items))
            log.debug("shared cache write failed: %s", type(exc).__name__)
            return
        self.breaker.succeeded()
        self._metrics.cache_writes_total.labels(self.tier, "ok").inc(len(items))

    async def close(self) -> None:
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=self.timeout_s)
        for task in self._writes:
            task.cancel()
        await self._client.aclose()
        await self._pool.disconnect()


class EmbeddingCache:
    """Both tiers behind one lookup and one write; see the module docstring."""

    def __init__(self, settings: Settings, fingerprint: str, metrics: Metrics) -> None:
        self._metrics = metrics
        self._prefix = f"cliplens:v{VECTOR_FORMAT}:{fingerprint[:32]}:"
        self.fingerprint = fingerprint
        self.memory = MemoryTier(settings.cache_bytes, metrics) if settings.cache_bytes else None
        self.shared = None
        if settings.cache_url:
            self.shared = SharedTier(
                settings.cache_url,
                settings.cache_timeout_ms / 1000.0,
                settings.cache_connections,
                settings.cache_ttl_s,
                metrics,
            )
        self.shared_url = _without_password(settings.cache_url)
        self.ttl_s = settings.cache_ttl_s
        metrics.cache_capacity_bytes.set(settings.cache_bytes)

    @property
    def tiers(self) -> tuple[str, ...]:
        named = (("memory", self.memory), ("redis", self.shared))
        return tuple(tier for tier, part in named if part is not None)

    def key(self, content: bytes) -> str:
        """The cache key of a content digest (`content_key`) under this model."""
        return self._prefix + content.hex()

    def bypass(self, count: int) -> None:
        """`count` lookups skipped because the request asked for it (`"cache": false`)."""
        for tier in self.tiers:
            self._metrics.cache_requests_total.labels(tier, "bypass").inc(count)

    async def get_many(self, keys: Sequence[str]) -> list[tuple[np.ndarray | None, str | None]]:
        """For each key, its vector and the tier that had it, or (None, None)."""
        found: list[tuple[bytes | None, str | None]] = [(None, None)] * len(keys)
        if self.memory is not None:
            started = time.perf_counter()
            found = [(value, "memory" if value is not None else None) for value in map(self.memory.get, keys)]
            self._metrics.cache_seconds.labels("memory").observe(time.perf_counter() - started)
            hits = sum(tier is not None for _, tier in found)
            self._metrics.cache_requests_total.labels("memory", "hit").inc(hits)
            self._metrics.cache_requests_total.labels("memory", "miss").inc(len(keys) - hits)
        missing = [index for index, (value, _) in enumerate(found) if value is None]
        if missing and self.shared is not None:
            values = await self.shared.get_many([keys[index] for index in missing])
            for index, value in zip(missing, values, strict=True):
                if value is not None:
                    found[index] = (value, self.shared.tier)
                    if self.memory is not None:
                        self.memory.put(keys[index], value)
        return [
            (np.frombuffer(value, dtype="<f4") if value is not None else None, tier) for value, tier in found
        ]

    def put_many(self, items: Sequence[tuple[str, np.ndarray]]) -> None:
        encoded = [(key, np.asarray(vector, dtype="<f4").tobytes()) for key, vector in items]
        if self.memory is not None:
            for key, value in encoded:
                self.memory.put(key, value)
        if self.shared is not None and encoded:
            self.shared.put_later(encoded)

    async def close(self) -> None:
        if self.shared is not None:
            await self.shared.close()


def _without_password(url: str | None) -> str | None:
    """The URL as it may be shown (/v1/models, logs): without its user and password."""
    if not url:
        return None
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
