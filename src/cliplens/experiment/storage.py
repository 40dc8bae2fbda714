"""Where the experiment's photos are put for the service to load: a local directory or a bucket.

The experiment measures the service loading photos from its real source, so the corpus is first
placed there and the requests then name the photos the way a client would: object names relative
to the service's image directory, or `gs://bucket/object` URIs. Photos already in a bucket
(`--photos gs://BUCKET/PREFIX`) are listed instead, and measured where they are. Uploads and
listings go through gcloud-aio-storage, the library the service itself reads GCS with, to a real
bucket (credentials found the usual way) or to an emulator (`api_root`, no credentials); the API
root is always passed explicitly, as the service does, so that the experiment reads and writes
where its settings say and a stray `STORAGE_EMULATOR_HOST` cannot redirect it behind their back.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import aiohttp
from gcloud.aio.storage import Storage

from cliplens.experiment.corpus import PHOTO_SUFFIXES, UNKNOWN_SIZE, Photo
from cliplens.pipeline.references import validate_bucket
from cliplens.pipeline.sources import PUBLIC_API_ROOT
from cliplens.vocabulary import ItemError

log = logging.getLogger(__name__)

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


MAX_LISTED = 100_000
"""The most photos listed under a bucket prefix. The study reuses its photos cyclically and never
needs this many; a larger prefix is cut at the first this many by name (with a warning), which
bounds the listing to a hundred pages."""


@dataclass(frozen=True)
class BucketPrefix:
    """`gs://BUCKET/PREFIX`: photos already in a bucket, to be measured where they are."""

    bucket: str
    prefix: str
    """Like a folder: empty (the whole bucket) or ending with `/`, so that `gs://b/2024` is the
    objects under `2024/`, not also those under `2024-old/`."""

    @classmethod
    def parse(cls, uri: str) -> BucketPrefix:
        if not uri.startswith("gs://"):
            raise ValueError(f"{uri!r} is not a gs:// URI; write gs://BUCKET/PREFIX")
        bucket, _, prefix = uri.removeprefix("gs://").partition("/")
        try:
            validate_bucket(bucket)
        except ItemError as exc:
            raise ValueError(f"{uri!r}: {exc}") from None
        prefix = prefix.strip("/")
        return cls(bucket, f"{prefix}/" if prefix else "")

    def __str__(self) -> str:
        return f"gs://{self.bucket}/{self.prefix}"


class BucketUnreadable(RuntimeError):
    """The bucket cannot be listed (missing, forbidden, unreachable); the message says which."""


def _client(session: aiohttp.ClientSession, api_root: str | None) -> Storage:
    """Google's API with the credentials found the usual way, or an emulator (`api_root`) without."""
    if api_root is None:
        return Storage(session=session, api_root=PUBLIC_API_ROOT, api_is_dev=False)  # type: ignore[arg-type]
    root = api_root if "://" in api_root else f"http://{api_root}"
    return Storage(session=session, api_root=root, api_is_dev=True)  # type: ignore[arg-type]


def _is_photo(item: Mapping[str, Any]) -> bool:
    """An object the service can be asked to decode: an image content type or a photo's suffix (not
    a folder placeholder, not a text file beside the photos)."""
    name = str(item.get("name", ""))
    if not name or name.endswith("/"):
        return False
    content_type = str(item.get("contentType") or "")
    return content_type.startswith("image/") or PurePosixPath(name).suffix.lower() in PHOTO_SUFFIXES


async def _list(source: BucketPrefix, api_root: str | None, cap: int) -> tuple[list[Photo], bool]:
    params = {
        "prefix": source.prefix,
        "maxResults": "1000",
        "fields": "items(name,size,contentType),nextPageToken",
    }
    photos: list[Photo] = []
    async with aiohttp.ClientSession() as session:
        client = _client(session, api_root)
        while True:
            page = await client.list_objects(source.bucket, params=params, timeout=60)
            photos.extend(
                Photo(item["name"], UNKNOWN_SIZE, 0, 0, int(item.get("size", 0)))
                for item in page.get("items", [])
                if _is_photo(item)
            )
            token = page.get("nextPageToken")
            if not token or len(photos) >= cap:
                return sorted(photos[:cap], key=lambda photo: photo.name), len(photos) > cap or bool(token)
            params["pageToken"] = token


def list_photos(source: BucketPrefix, api_root: str | None = None, cap: int = MAX_LISTED) -> list[Photo]:
    """The photos under `source`, sorted by object name (each `Photo.name` is the object's name).

    Only the listing is read: sizes in bytes come with it, pixel dimensions would cost a download
    each, so they are unknown (`UNKNOWN_SIZE`). Raises BucketUnreadable when the bucket cannot be
    listed, ValueError when the prefix holds no photos.
    """
    where = f"{source}" + (f" on {api_root}" if api_root else "")
    try:
        photos, cut = asyncio.run(_list(source, api_root, cap))
    except aiohttp.ClientResponseError as exc:
        if exc.status == 404:
            raise BucketUnreadable(
                f"cannot list {where}: the bucket {source.bucket!r} does not exist (HTTP 404)"
            ) from None
        if exc.status in (401, 403):
            raise BucketUnreadable(
                f"cannot list {where}: permission denied (HTTP {exc.status}); the credentials need "
                "storage.objects.list on the bucket"
            ) from None
        raise BucketUnreadable(f"cannot list {where}: HTTP {exc.status} {exc.message[:200]}") from None
    except Exception as exc:  # no credentials, GCS unreachable: whatever it is, the message says it
        hint = (
            ""
            if api_root
            else " (credentials come from GOOGLE_APPLICATION_CREDENTIALS or the metadata server; for an "
            "emulator, set STORAGE_EMULATOR_HOST and CLIPLENS_ALLOW_EMULATOR=1)"
        )
        raise BucketUnreadable(f"cannot list {where}: {type(exc).__name__}: {exc}{hint}") from exc
    if not photos:
        raise ValueError(
            f"{source} holds no photos (objects with an image/* content type or named "
            f"{', '.join(PHOTO_SUFFIXES)})"
        )
    if cut:
        log.warning("%s holds more than %d photos: the first %d by name are used", source, cap, cap)
    return photos


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
        storage = _client(session, api_root)

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
    """Upload the photos to `gs://bucket/prefix/...` (Google's; an emulator when `api_root` is set);
    their URIs."""
    asyncio.run(_upload(photos, corpus_dir, bucket, prefix, api_root, parallel, on_upload))
    return gcs_references(photos, bucket, prefix)


def gcs_references(photos: Sequence[Photo], bucket: str, prefix: str) -> list[str]:
    """The `gs://` URIs the requests name: valid with any default bucket the service may have."""
    return [f"gs://{bucket}/{object_name(prefix, photo)}" for photo in photos]
