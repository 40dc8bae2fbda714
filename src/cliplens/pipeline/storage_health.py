"""Is the storage there? Checked at start and every `CHECK_INTERVAL_S` while serving.

Without a check, a wrong image directory, an unreadable bucket or missing credentials show up only
as per-item `not_found` / `storage_unavailable`, after the download retries. Here:

- the local image directory must be a readable directory when the service starts, or it does not
  start (`SettingsError`, one line naming `CLIPLENS_IMAGE_ROOT`); later it is re-checked, since a
  mount can go away;
- the default bucket is checked with one metadata request (a few hundred bytes, the credentials'
  read access to the bucket), logged with its result, and re-checked while serving.

Each result is on `/readyz` (its body), on `cliplens_storage_up{source}` and in the log when it
changes. With `CLIPLENS_READY_REQUIRES_STORAGE=1` readiness also fails while a source is down, so a
replica that cannot reach its photos leaves the load balancer; by default it stays in, because a
replica with a cache and inline images can still serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from cliplens.pipeline.sources import GcsSource
from cliplens.settings import SettingsError
from cliplens.telemetry.metrics import Metrics

log = logging.getLogger(__name__)
CHECK_INTERVAL_S = 30.0
CHECK_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class StorageStatus:
    """One source's last check."""

    up: bool
    detail: str


def check_image_root(root: Path) -> StorageStatus:
    """Whether `root` is a directory this process can list and read."""
    if not root.is_dir():
        return StorageStatus(False, f"{root} is not a directory")
    if not os.access(root, os.R_OK | os.X_OK):
        return StorageStatus(False, f"{root} is not readable by this process")
    return StorageStatus(True, f"{root} is readable")


def require_image_root(root: Path) -> None:
    """At start: refuse to serve from an image directory that is not there (one line, the fix named)."""
    status = check_image_root(root)
    if not status.up:
        raise SettingsError(f"CLIPLENS_IMAGE_ROOT={status.detail}")


async def check_bucket(gcs: GcsSource, bucket: str) -> StorageStatus:
    """One metadata request on the bucket: reachable, and readable with these credentials."""
    try:
        await gcs.storage.get_bucket_metadata(bucket, timeout=int(CHECK_TIMEOUT_S))
    except aiohttp.ClientResponseError as exc:
        return StorageStatus(False, f"gs://{bucket}: HTTP {exc.status} {exc.message[:200]}")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return StorageStatus(False, f"gs://{bucket}: unreachable ({type(exc).__name__}: {exc})"[:300])
    return StorageStatus(True, f"gs://{bucket} is reachable")


class StorageHealth:
    """The checks of one service's sources, and their last results."""

    def __init__(
        self, metrics: Metrics, image_root: Path | None, gcs: GcsSource | None, bucket: str | None
    ) -> None:
        self._metrics = metrics
        self._image_root = image_root
        self._gcs = gcs if bucket else None
        self._bucket = bucket
        self.status: dict[str, StorageStatus] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="cliplens-storage-check")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def check(self) -> None:
        """Check every configured source once, and record the results."""
        if self._image_root is not None:
            self._record("local", await asyncio.to_thread(check_image_root, self._image_root))
        if self._gcs is not None and self._bucket is not None:
            self._record("gcs", await check_bucket(self._gcs, self._bucket))

    async def _run(self) -> None:
        while True:
            await self.check()
            await asyncio.sleep(CHECK_INTERVAL_S)

    def _record(self, source: str, status: StorageStatus) -> None:
        before = self.status.get(source)
        self.status[source] = status
        self._metrics.storage_up.labels(source).set(int(status.up))
        if before is None or before.up != status.up:
            level = logging.INFO if status.up else logging.ERROR
            log.log(level, "storage check: %s", status.detail, extra={"source": source, "up": status.up})
