"""Where the study puts its photos, one type per storage kind: a local directory, fake GCS, real GCS;
and photos already in a bucket, which are measured where they are.

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
DEFAULT_PREFIX = "cliplens-experiment"
"""The object name prefix of the uploads when the plan names none."""


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
    """A directory the service reads (CLIPLENS_IMAGE_ROOT): no cloud, the embedded default.

    Photos that lie under that directory are named in place, relative to it: a folder the service
    already reads is measured as it is, nothing copied. Photos elsewhere are copied under it first
    (`storage.local_references`)."""

    def __init__(self, image_root: Path | None, started_here: bool) -> None:
        """`image_root`: the service's image directory; None: the corpus directory itself.
        `started_here`: the service is started in this process and set to read that directory;
        else it is a running service, which already reads it."""
        super().__init__()
        self.image_root = image_root
        self.started_here = started_here

    def place(self, photos: Sequence[Photo], directory: Path, progress: Progress) -> Placement:
        root = self.image_root or directory
        references = storage.local_references(photos, directory, root)
        settings: dict[str, Any] = {}
        if self.started_here:
            settings = {"image_root": root, "default_bucket": None, "allowed_buckets": ()}
        in_place = directory.resolve().is_relative_to(root.resolve())
        return Placement(references, settings, storage={"image_root": str(root), "in_place": in_place})


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
    """A real bucket, written with the credentials found the usual way; or, when the settings name
    one (`STORAGE_EMULATOR_HOST`, allowed by `CLIPLENS_ALLOW_EMULATOR=1`), the emulator that an
    in-process service then reads too."""

    def __init__(self, bucket: str, prefix: str, emulator: str | None = None) -> None:
        super().__init__()
        self.bucket = bucket
        self.prefix = prefix
        self.emulator = emulator

    def place(self, photos: Sequence[Photo], directory: Path, progress: Progress) -> Placement:
        return Placement(
            references=_upload(photos, directory, self.bucket, self.prefix, self.emulator, progress),
            settings={"image_root": None, "default_bucket": self.bucket},
            storage={"bucket": self.bucket, "prefix": self.prefix, "emulator": self.emulator},
        )


class InPlaceGcsTarget(Target):
    """Photos already in a bucket (`--photos gs://BUCKET/PREFIX`, listed by the study): nothing is
    uploaded, the requests name the objects as they are. GCS is Google's, or the emulator of the
    settings, as for `GcsTarget`."""

    def __init__(self, source: storage.BucketPrefix, emulator: str | None = None) -> None:
        super().__init__()
        self.source = source
        self.emulator = emulator

    def place(self, photos: Sequence[Photo], directory: Path, progress: Progress) -> Placement:
        bucket = self.source.bucket
        return Placement(
            references=[f"gs://{bucket}/{photo.name}" for photo in photos],
            settings={"image_root": None, "default_bucket": bucket},
            storage={
                "bucket": bucket,
                "prefix": self.source.prefix,
                "emulator": self.emulator,
                "in_place": True,
            },
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
