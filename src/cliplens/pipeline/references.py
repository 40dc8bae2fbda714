"""What an image item of a request refers to, parsed and validated before any I/O.

An item is one of: a `gs://bucket/object` URI, a `data:image/...;base64,` URI, an `https://` URL
(`http://` too when allowed) on a host of `CLIPLENS_URL_HOSTS`, or a bare object name in the
default image source (the default bucket when one is set, else the local directory). Anything
else is refused. URLs are off unless hosts are listed (`forbidden`): fetching an address a client
chose is a request forgery risk, so a URL passes the rules of pipeline/urls.py here (scheme,
syntax, credentials, allowlist) and again, with its resolved addresses, before any connection.
Validation follows the GCS naming rules, so that a crafted bucket or object name can never change
the URL the storage client builds.

Parsing runs on the event loop, so it costs no more than a glance at the string: a reference too
long to name any object is refused from its length alone, and a large data: URI is not decoded
here but handed to the load stage, which decodes it off the loop (`DataUriReference`).
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

import yarl

from cliplens.pipeline.urls import SCHEMES, UrlPolicy, redacted
from cliplens.vocabulary import ErrorCode, ItemError

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"^{_OCTET}(?:\.{_OCTET}){{3}}$")
_GOOGLE = re.compile(r"g[o0][o0]gle")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DATA_URI = re.compile(r"^data:(image/[A-Za-z0-9.+-]+)?((?:;[A-Za-z0-9=.+-]+)*);base64,", re.IGNORECASE)
_SPACES = re.compile(r"\s*")
_DATA_URI_HEADER_CHARS = 256
"""The most of a data: URI searched for its `data:...;base64,` header, so that a long string
without one is refused without scanning it."""

MAX_NAME_BYTES = 1024
"""GCS's limit on an object name, in bytes of UTF-8."""
MAX_REFERENCE_BYTES = len("gs://") + 222 + len("/") + MAX_NAME_BYTES
"""The longest reference that can name an object at all (a gs:// URI with the longest bucket and
object names); anything longer but a data: URI is refused before any other check."""

DECODE_CHUNK_CHARS = 1024 * 1024
"""Base64 is decoded this many characters at a time (a multiple of 4; about a millisecond each):
binascii holds the GIL for a whole call, so a large payload decoded in one call would stop every
other thread, the event loop's included, for its whole length. Payloads up to this size are
decoded while parsing; larger ones by the load stage, in a worker thread, chunk by chunk."""


@dataclass(frozen=True, slots=True)
class GcsReference:
    """An object in a Google Cloud Storage bucket."""

    bucket: str
    name: str

    def __str__(self) -> str:
        return f"gs://{self.bucket}/{self.name}"


@dataclass(frozen=True, slots=True)
class LocalReference:
    """A file under the local image directory, by its relative name."""

    name: str

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True)
class UrlReference:
    """An image at an http(s) URL that passed the URL policy's checks (pipeline/urls.py); the load
    stage checks its addresses, and every redirect's, before connecting."""

    url: yarl.URL

    def __str__(self) -> str:
        return redacted(self.url)


@dataclass(frozen=True, slots=True)
class InlineReference:
    """Image bytes that came with the request (a data: URI or an uploaded file)."""

    data: bytes
    label: str

    def __str__(self) -> str:
        return self.label


@dataclass(frozen=True, slots=True)
class DataUriReference:
    """A data: URI too large to decode on the event loop: the request's own string and where its
    base64 payload lies in it (kept whole rather than sliced: a slice would copy it)."""

    text: str
    start: int
    end: int
    label: str

    def __str__(self) -> str:
        return self.label

    def decode(self) -> bytes:
        """The payload's bytes. Blocking, in time proportional to the payload: call it from a
        worker thread, where its chunks let the event loop run between them."""
        return decode_base64(self.text, self.start, self.end)


@dataclass(frozen=True, slots=True)
class RefusedReference:
    """An item already known to fail before any I/O (an uploaded file over the byte cap): it keeps
    the error, not the bytes, and the load stage raises it."""

    code: ErrorCode
    message: str
    label: str

    def __str__(self) -> str:
        return self.label


Reference = (
    GcsReference | LocalReference | UrlReference | InlineReference | DataUriReference | RefusedReference
)


def decode_base64(text: str, start: int, end: int) -> bytes:
    """Strict base64 of `text[start:end]`, decoded `DECODE_CHUNK_CHARS` at a time.

    Raises `invalid_reference` for anything but the base64 alphabet, padding anywhere but at the
    very end, or a length that is not a whole number of quanta.
    """
    parts: list[bytes] = []
    try:
        for offset in range(start, end, DECODE_CHUNK_CHARS):
            chunk = text[offset : min(offset + DECODE_CHUNK_CHARS, end)]
            if offset + DECODE_CHUNK_CHARS < end and chunk.endswith("="):
                raise ValueError("padding before the end")
            parts.append(base64.b64decode(chunk, validate=True))
    except (binascii.Error, ValueError):
        raise ItemError(ErrorCode.INVALID_REFERENCE, "the data URI payload is not valid base64") from None
    return b"".join(parts)


def _is_longer_than(text: str, limit: int) -> bool:
    """Whether `text` is more than `limit` bytes of UTF-8, without encoding a long string."""
    return len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit


def validate_bucket(bucket: str) -> None:
    """Raise `invalid_reference` unless `bucket` is a valid GCS bucket name.

    GCS's rules: 3-63 characters of `a-z 0-9 - _ .`, starting and ending with a letter or digit;
    with dots, up to 222 characters in dot-separated parts of 1-63; not an IPv4 address; not
    starting with `goog`, not containing `google` or a close misspelling of it.
    """
    if (
        not _BUCKET.fullmatch(bucket)
        or any(not 1 <= len(part) <= 63 for part in bucket.split("."))
        or _IPV4.fullmatch(bucket)
        or bucket.startswith("goog")
        or _GOOGLE.search(bucket)
    ):
        raise ItemError(ErrorCode.INVALID_REFERENCE, f"{bucket!r} is not a valid bucket name")


def validate_object_name(name: str) -> None:
    """Raise `invalid_reference` unless `name` is a valid GCS object name (also used for local names)."""
    if not name:
        raise ItemError(ErrorCode.INVALID_REFERENCE, "the object name is empty")
    if _is_longer_than(name, MAX_NAME_BYTES):
        raise ItemError(ErrorCode.INVALID_REFERENCE, f"the object name is longer than {MAX_NAME_BYTES} bytes")
    if _CONTROL.search(name):
        raise ItemError(ErrorCode.INVALID_REFERENCE, "the object name contains control characters")
    if name in (".", "..") or name.startswith(".well-known/acme-challenge/"):
        raise ItemError(ErrorCode.INVALID_REFERENCE, f"{name!r} is not a valid object name")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ItemError(ErrorCode.INVALID_REFERENCE, "the object name is not valid UTF-8") from None


@dataclass(frozen=True)
class ReferenceParser:
    """Turns the strings of a request into references, under the service's source settings."""

    buckets: frozenset[str]
    default_bucket: str | None
    has_local_root: bool
    max_image_bytes: int
    urls: UrlPolicy | None = None
    """Which URLs items may name; None (or no hosts) = URLs are `forbidden`."""

    def parse(self, item: str) -> Reference:
        """Parse one input string; raise ItemError with the code the client should see."""
        if item[:5].lower() == "data:":
            return self._parse_data_uri(item)
        if self.urls is not None and self.urls.enabled and item[:8].lower().startswith(SCHEMES):
            return UrlReference(self.urls.check(item).url)  # its own length cap (MAX_URL_BYTES)
        if _is_longer_than(item, MAX_REFERENCE_BYTES):
            raise ItemError(
                ErrorCode.INVALID_REFERENCE,
                f"the reference is longer than any storage name can be ({MAX_REFERENCE_BYTES} bytes; "
                f"an object name is at most {MAX_NAME_BYTES} bytes)",
            )
        if item[:5].lower() == "gs://":
            return self._parse_gs_uri(item)
        if _SCHEME.match(item):
            scheme = item.split(":", 1)[0]
            if item[:8].lower().startswith(SCHEMES):
                raise ItemError(
                    ErrorCode.FORBIDDEN,
                    f"{scheme}:// URLs are off in this service (CLIPLENS_URL_HOSTS lists the hosts allowed)",
                )
            raise ItemError(
                ErrorCode.INVALID_REFERENCE,
                f"{scheme}:// references are not fetched; use gs://, data: or an object name",
            )
        validate_object_name(item)
        if self.default_bucket:
            return GcsReference(self.default_bucket, item)
        if self.has_local_root:
            return LocalReference(item)
        raise ItemError(
            ErrorCode.INVALID_REFERENCE,
            "no default image source is configured (set CLIPLENS_DEFAULT_BUCKET or CLIPLENS_IMAGE_ROOT)",
        )

    def _parse_gs_uri(self, item: str) -> GcsReference:
        bucket, sep, name = item[5:].partition("/")
        if not sep:
            raise ItemError(ErrorCode.INVALID_REFERENCE, "a gs:// URI needs gs://bucket/object")
        validate_bucket(bucket)
        validate_object_name(name)
        if bucket not in self.buckets:
            raise ItemError(ErrorCode.FORBIDDEN, f"bucket {bucket!r} is not in the allowed buckets")
        return GcsReference(bucket, name)

    def _parse_data_uri(self, item: str) -> InlineReference | DataUriReference:
        match = _DATA_URI.match(item[:_DATA_URI_HEADER_CHARS])
        if match is None:
            raise ItemError(
                ErrorCode.INVALID_REFERENCE, "a data URI must look like data:image/<type>;base64,<data>"
            )
        end = len(item.rstrip())  # no copy unless there is trailing space: the payload is never sliced
        spaces = _SPACES.match(item, match.end(), end)
        start = spaces.end() if spaces else end
        if (end - start) * 3 // 4 > self.max_image_bytes:
            raise ItemError(
                ErrorCode.TOO_LARGE, f"the inline image is larger than {self.max_image_bytes} bytes"
            )
        media_type = match.group(1) or ""
        if end - start > DECODE_CHUNK_CHARS:
            size = (end - start) * 3 // 4 - item.count("=", end - 2, end)
            return DataUriReference(item, start, end, f"data:{media_type};base64,...({size} bytes)")
        data = decode_base64(item, start, end)
        return InlineReference(data, f"data:{media_type};base64,...({len(data)} bytes)")
