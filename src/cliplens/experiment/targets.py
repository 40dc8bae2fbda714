"""Where the study puts its photos, one type per storage kind: a local directory, fake GCS, real GCS.

Each target is a context manager with one method, `place`: it puts the photos where the service
will read them and returns a `Placement`: the references the requests name, the settings an
in-process service needs to read them there, and what results.json records about the storage.
Whatever a target starts for that (fake-gcs-server, the latency proxy) lives until its `with`
block ends, so the study measures inside the block. A running service (`--url`) is pointed at
by the target's arguments (its image root, its emulator) instead of configured by the settings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
from rich.progress import Progress

from cliplens.experiment import fakegcs, storage
from cliplens.experiment.corpus import Photo
from cliplens.experiment.latency import LatencyProxy

DEFAULT_FAKE_BUCKET = "cliplens-experiment"
"""The bucket fake GCS gets when the plan names none: the emulator starts empty, so any name does."""


class PlacementError(RuntimeError):
    """The photos could not be put where the service reads; the message says where and why."""


@dataclass(frozen=True)
class Placement:
    """The photos, placed: how to name them, and how a service must be set to find them."""

    references: list[str]
    """What the requests send, one per photo, in the photos' order."""
    settings: dict[str, Any]
    """Changes to an in-process service's settings (`dataclasses.replace`); unused for a running one."""
    storage: dict[str, Any] = field(default_factory=dict)
    """For results.json's `storage`: where the photos are and where the service reads them."""


class Target:
    """A storage kind's target; `with` keeps alive what `place` starts (see the module docstring)."""

    def __init__(self) -> None:
        self._resources = contextlib.ExitStack()

    def __enter__(self) -> Target:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._resources.close()

    def place(self, photos: Sequence[Photo], directory: Path, progress: Progress) -> Placement:
        """Put `photos` (files in `directory`) where the service reads; report on `progress`."""
        raise NotImplementedError


class LocalTarget(Target):
    """A directory the service reads (CLIPLENS_IMAGE_ROOT): no cloud, the embedded default."""

    def __init__(self, service_root: Path | None) -> None:
        """`service_root`: a running service's image root (the photos are copied under it when they
        lie elsewhere); None: the service is started here, reading the corpus directory itself."""
        super().__init__()
        self.service_root = service_root

    def place(self, photos: Sequence[Photo], directory: Path, progress: Progress) -> Placement:
        if self.service_root is None:
            return Placement(
                references=[photo.name for photo in photos],
                settings={"image_root": directory, "default_bucket": None, "allowed_buckets": ()},
                storage={"image_root": str(directory)},
            )
        return Placement(
            references=storage.local_references(photos, directory, self.service_root),
            settings={},
            storage={"image_root": str(self.service_root)},
        )


class FakeGcsTarget(Target):
    """fake-gcs-server: started here on loopback, optionally behind the latency proxy so that
    `load` behaves like a real bucket; or the emulator a running service already reads."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        emulator: str | None,
        log_path: Path,
        delay_ms: float = 0.0,
        jitter_ms: float = 0.0,
        rate_mbps: float | None = None,
        seed: int = 0,
    ) -> None:
        """`emulator`: a running service's fake-gcs-server; None starts one (its output in `log_path`).
        The delay and rate shape the started one only (the plan refuses them with a running service)."""
        super().__init__()
        self.bucket = bucket
        self.prefix = prefix
        self.emulator = emulator
        self.log_path = log_path
        self.delay_ms = delay_ms
        self.jitter_ms = jitter_ms
        self.rate_mbps = rate_mbps
        self.seed = seed

    def place(self, photos: Sequence[Photo], directory: Path, progress: Progress) -> Placement:
        if self.emulator is not None:
            with httpx.Client(timeout=10) as client:
                client.post(f"{self.emulator}/storage/v1/b", json={"name": self.bucket})
            references = _upload(photos, directory, self.bucket, self.prefix, self.emulator, progress)
            return Placement(
                references=references,
                settings={},
                storage={"emulator": self.emulator, "bucket": self.bucket, "prefix": self.prefix},
            )
        gcs = self._resources.enter_context(fakegcs.FakeGcsServer(self.log_path))
        gcs.create_bucket(self.bucket)
        references = _upload(photos, directory, self.bucket, self.prefix, gcs.url, progress)
        reads_from = gcs.url
        described: dict[str, Any] = {"emulator": gcs.url}
        if self.delay_ms > 0 or self.rate_mbps is not None:
            proxy = self._resources.enter_context(
                LatencyProxy(
                    gcs.host,
                    gcs.port,
                    delay_ms=self.delay_ms,
                    rate_mbps=self.rate_mbps,
                    jitter_ms=self.jitter_ms,
                    seed=self.seed,
                )
            )
            reads_from = proxy.url
            # The proxy's counters are complete once the measurement is over: when the target closes.
            self._resources.callback(lambda: described.update(proxy=proxy.describe()))
        described.update(service_reads_from=reads_from, bucket=self.bucket, prefix=self.prefix)
        return Placement(
            references=references,
            settings={
                "image_root": None,
                "default_bucket": self.bucket,
                "allowed_buckets": (),
                "gcs_emulator_host": reads_from,
                "allow_emulator": True,
            },
            storage=described,
        )


class GcsTarget(Target):
    """A real bucket, written with the credentials found the usual way."""

    def __init__(self, bucket: str, prefix: str) -> None:
        super().__init__()
        self.bucket = bucket
        self.prefix = prefix

    def place(self, photos: Sequence[Photo], directory: Path, progress: Progress) -> Placement:
        return Placement(
            references=_upload(photos, directory, self.bucket, self.prefix, None, progress),
            settings={"image_root": None, "default_bucket": self.bucket, "gcs_emulator_host": None},
            storage={"bucket": self.bucket, "prefix": self.prefix},
        )


def _upload(
    photos: Sequence[Photo],
    directory: Path,
    bucket: str,
    prefix: str,
    api_root: str | None,
    progress: Progress,
) -> list[str]:
    where = f"gs://{bucket}/{prefix}" + (f" on {api_root}" if api_root else "")
    task = progress.add_task(f"uploading to {where}", total=len(photos))
    try:
        return storage.upload(
            photos, directory, bucket, prefix, api_root, on_upload=lambda _: progress.advance(task)
        )
    except Exception as exc:
        raise PlacementError(f"uploading the photos to {where} failed: {exc}") from exc
