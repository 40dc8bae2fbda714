"""Where the experiment's photos are put for the service to load: a local directory or a bucket.

The experiment measures the service loading photos from its real source, so the corpus is first
placed there and the requests then name the photos the way a client would: object names relative
to the service's image directory, or `gs://bucket/object` URIs. Uploads go through
gcloud-aio-storage, the library the service itself reads GCS with, to a real bucket (credentials
found the usual way) or to an emulator (`api_root`, no credentials).
"""

from __future__ import annotations

import asyncio
import mimetypes
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import aiohttp
from gcloud.aio.storage import Storage

from cliplens.experiment.corpus import Photo

StorageKind = Literal["local", "fake-gcs", "gcs"]
STORAGE_KINDS: tuple[StorageKind, ...] = ("local", "fake-gcs", "gcs")
"""`--storage`: each has its target in targets.py. Kept here, beside only core dependencies, since the
command line's parser lists them for every command, `cliplens serve` included."""


def local_references(photos: Sequence[Photo], corpus_dir: Path, image_root: Path) -> list[str]:
    """Names of the photos relative to the service's image directory, copying them in if needed.

    When the corpus already lies under `image_root` nothing is copied; otherwise the photos are
    copied into `image_root/cliplens-experiment/` (kept if already there with the same size).
    """
    corpus_dir, image_root = corpus_dir.resolve(), image_root.resolve()
    if corpus_dir.is_relative_to(image_root):
        base = corpus_dir.relative_to(image_root)
        return [(base / photo.name).as_posix() for photo in photos]
    target = image_root / "cliplens-experiment"
    references = []
    for photo in photos:
        destination = target / photo.name
        if not destination.exists() or destination.stat().st_size != photo.bytes:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(corpus_dir / photo.name, destination)
        references.append(destination.relative_to(image_root).as_posix())
    return references


def object_name(prefix: str, photo: Photo) -> str:
    prefix = prefix.strip("/")
    return f"{prefix}/{photo.name}" if prefix else photo.name


async def _upload(
    photos: Sequence[Photo],
    corpus_dir: Path,
    bucket: str,
    prefix: str,
    api_root: str | None,
    parallel: int,
    on_upload: Callable[[Photo], None] | None,
) -> None:
    slots = asyncio.Semaphore(parallel)
    async with aiohttp.ClientSession() as session:
        storage = Storage(session=session, api_root=api_root)  # type: ignore[arg-type]

        async def one(photo: Photo) -> None:
            data = await asyncio.to_thread((corpus_dir / photo.name).read_bytes)
            content_type = mimetypes.guess_type(photo.name)[0] or "application/octet-stream"
            async with slots:
                await storage.upload(
                    bucket, object_name(prefix, photo), data, content_type=content_type, timeout=300
                )
            if on_upload is not None:
                on_upload(photo)

        await asyncio.gather(*(one(photo) for photo in photos))


def upload(
    photos: Sequence[Photo],
    corpus_dir: Path,
    bucket: str,
    prefix: str,
    api_root: str | None = None,
    parallel: int = 8,
    on_upload: Callable[[Photo], None] | None = None,
) -> list[str]:
    """Upload the photos to `gs://bucket/prefix/...` (an emulator when `api_root` is set); their URIs."""
    asyncio.run(_upload(photos, corpus_dir, bucket, prefix, api_root, parallel, on_upload))
    return gcs_references(photos, bucket, prefix)


def gcs_references(photos: Sequence[Photo], bucket: str, prefix: str) -> list[str]:
    """The `gs://` URIs the requests name: valid with any default bucket the service may have."""
    return [f"gs://{bucket}/{object_name(prefix, photo)}" for photo in photos]
