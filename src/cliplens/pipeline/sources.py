"""Image sources: a reference in, the image's encoded bytes out (the `load` stage).

Three sources: Google Cloud Storage through gcloud-aio-storage (one HTTP session for the life of
the app, never one per request), a local directory (the embedded default: the service runs with no
cloud at all), and bytes that came inline with the request. Every failure becomes an ItemError with
the vocabulary's code; nothing here knows about HTTP responses of the API.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import aiohttp
from gcloud.aio.storage import Storage

from cliplens.pipeline.errors import ErrorCode, ItemError
from cliplens.pipeline.references import GcsReference, InlineReference, LocalReference, Reference

log = logging.getLogger(__name__)

_CHUNK = 256 * 1024


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
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise ItemError(ErrorCode.FORBIDDEN, "the name resolves outside the image directory")
        return path

    def read(self, name: str) -> bytes:
        """Read the file (blocking: call it off the event loop)."""
        path = self.resolve(name)
        try:
            with path.open("rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size > self.max_bytes:
                    raise ItemError(ErrorCode.TOO_LARGE, f"the file is larger than {self.max_bytes} bytes")
                return handle.read(self.max_bytes + 1)
        except FileNotFoundError:
            raise ItemError(ErrorCode.NOT_FOUND, f"{name!r} does not exist") from None
        except IsADirectoryError:
            raise ItemError(ErrorCode.NOT_FOUND, f"{name!r} is a directory") from None
        except PermissionError:
            raise ItemError(ErrorCode.FORBIDDEN, f"{name!r} is not readable") from None


class GcsSource:
    """Objects in GCS buckets, streamed through one shared aiohttp session, stopped at the byte cap."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        max_bytes: int,
        emulator_host: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        api_root = (
            emulator_host if emulator_host is None or "://" in emulator_host else f"http://{emulator_host}"
        )
        self.storage = Storage(session=session, api_root=api_root)  # type: ignore[arg-type]
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def read(self, reference: GcsReference) -> bytes:
        try:
            stream = await self.storage.download_stream(
                reference.bucket,
                reference.name,
                timeout=self.timeout_s,  # type: ignore[arg-type]
            )
            async with stream:
                if stream.content_length > self.max_bytes:
                    raise ItemError(ErrorCode.TOO_LARGE, f"the object is larger than {self.max_bytes} bytes")
                chunks: list[bytes] = []
                received = 0
                while chunk := await stream.read(_CHUNK):
                    received += len(chunk)
                    if received > self.max_bytes:
                        raise ItemError(
                            ErrorCode.TOO_LARGE, f"the object is larger than {self.max_bytes} bytes"
                        )
                    chunks.append(chunk)
                return b"".join(chunks)
        except aiohttp.ClientResponseError as exc:
            raise _from_status(exc.status, reference) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ItemError(
                ErrorCode.STORAGE_UNAVAILABLE, f"storage did not answer for {reference}: {type(exc).__name__}"
            ) from None


def _from_status(status: int, reference: GcsReference) -> ItemError:
    if status == 404:
        return ItemError(ErrorCode.NOT_FOUND, f"{reference} does not exist")
    if status in (401, 403):
        return ItemError(ErrorCode.FORBIDDEN, f"access to {reference} was refused (HTTP {status})")
    if status == 400:
        return ItemError(ErrorCode.INVALID_REFERENCE, f"storage refused the name {reference} (HTTP 400)")
    return ItemError(ErrorCode.STORAGE_UNAVAILABLE, f"storage answered HTTP {status} for {reference}")


class ImageSources:
    """Routes each reference to the source that holds it."""

    def __init__(self, local: LocalDirectorySource | None, gcs: GcsSource | None, max_bytes: int) -> None:
        self.local = local
        self.gcs = gcs
        self.max_bytes = max_bytes

    def needs_slot(self, reference: Reference) -> bool:
        """Whether reading the reference is I/O that must wait for a download slot."""
        return not isinstance(reference, InlineReference)

    async def read(self, reference: Reference) -> bytes:
        if isinstance(reference, InlineReference):
            if len(reference.data) > self.max_bytes:
                raise ItemError(ErrorCode.TOO_LARGE, f"the image is larger than {self.max_bytes} bytes")
            return reference.data
        if isinstance(reference, LocalReference):
            if self.local is None:
                raise ItemError(ErrorCode.INVALID_REFERENCE, "no local image directory is configured")
            return await asyncio.to_thread(self.local.read, reference.name)
        if self.gcs is None:
            raise ItemError(ErrorCode.STORAGE_UNAVAILABLE, "GCS is not configured in this service")
        return await self.gcs.read(reference)
