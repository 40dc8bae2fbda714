"""The multipart body of POST /v1/embeddings/upload, read as it streams in.

Litestar's own multipart reading would do for well-formed forms, but not for hostile ones: a part
without a filename is decoded as text (binary bytes in it: a `UnicodeDecodeError`, a 500), every
file is spooled whole whatever its size, and a part count over the limit reads as "Request Entity
Too Large". Here the body is parsed with the same `multipart` library, chunk by chunk, and:

- each `files` part becomes one item: its bytes (at most `max_image_bytes` are kept; a part over
  that cap becomes a `too_large` item, its bytes dropped as they arrive), named by its filename,
  or `file-{index}` when it has none;
- `model`, `encoding_format` and `on_error` are short UTF-8 text fields, checked like the JSON
  route's (send `on_error=partial` to get the other files' vectors when some fail);
- parts under any other name are read past and dropped;
- whatever is malformed (syntax, more than `part_limit` parts, oversized part headers, invalid
  UTF-8 in a text field, an unknown `encoding_format` or `on_error`) is a 400 `invalid_body`.

Since the route has no Litestar `data` parameter, the form's OpenAPI schema is declared here
(`UploadOperation`), for the schema at /schema and the clients generated from it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast, get_args

from litestar.openapi.spec import OpenAPIMediaType, OpenAPIType, Operation, RequestBody, Schema
from litestar.openapi.spec.enums import OpenAPIFormat
from multipart import (  # type: ignore[import-untyped]
    MultipartSegment,
    ParserError,
    ParserLimitReached,
    PushMultipartParser,
)

from cliplens.api.schemas import EncodingFormat
from cliplens.pipeline.references import InlineReference, Reference, RefusedReference
from cliplens.settings import OnError
from cliplens.vocabulary import ErrorCode, RequestError, RequestErrorCode

MAX_FIELD_BYTES = 1024
"""The longest `model`, `encoding_format` or `on_error` value: all are short names."""

_ENCODING_FORMATS: tuple[str, ...] = get_args(EncodingFormat)
_ON_ERRORS: tuple[str, ...] = get_args(OnError)
_FIELDS = ("model", "encoding_format", "on_error")
_JOIN_ON_LOOP_BYTES = 1024 * 1024
"""A file part larger than this is joined in a worker thread: a copy of tens of megabytes (page
faults included) would otherwise hold the event loop for tens of milliseconds."""


@dataclass
class UploadForm:
    """What an upload asks for: one item per `files` part, in order."""

    files: list[Reference] = field(default_factory=list)
    model: str | None = None
    encoding_format: EncodingFormat = "float"
    on_error: OnError | None = None
    """Unset: the service's CLIPLENS_ON_ERROR."""
    body_bytes: int = 0
    """Bytes of the body read (the memory the request took in)."""


def _invalid(message: str) -> RequestError:
    return RequestError(RequestErrorCode.INVALID_BODY, message)


class _Part:
    """The part being read: a file's chunks up to the cap, or a text field's bytes."""

    def __init__(self, segment: Any, index: int, cap: int) -> None:
        self.name: str = segment.name or ""
        self.filename: str = segment.filename or ""
        self.index = index
        self.cap = cap
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size <= self.cap:
            self.chunks.append(chunk)
        else:
            self.chunks.clear()

    async def item(self, max_image_bytes: int) -> Reference:
        label = self.filename or f"file-{self.index}"
        if self.size > max_image_bytes:
            return RefusedReference(
                ErrorCode.TOO_LARGE, f"the file is larger than {max_image_bytes} bytes", label
            )
        if self.size < _JOIN_ON_LOOP_BYTES:
            return InlineReference(b"".join(self.chunks), label)
        return InlineReference(await asyncio.to_thread(b"".join, self.chunks), label)  # frees the GIL

    def text(self) -> str:
        if self.size > self.cap:
            raise _invalid(f"the `{self.name}` field is longer than {self.cap} bytes")
        try:
            return b"".join(self.chunks).decode("utf-8")
        except UnicodeDecodeError:
            raise _invalid(f"the `{self.name}` field is not valid UTF-8") from None


async def read_upload(
    chunks: AsyncIterator[bytes],
    content_type: tuple[str, dict[str, str]],
    max_image_bytes: int,
    part_limit: int,
) -> UploadForm:
    """The form of a body read from `chunks`; `content_type` is its parsed Content-Type header.

    An empty body is an empty form (no items: 422 `empty_input` at the route), as Litestar had it.
    """
    media_type, options = content_type
    boundary = options.get("boundary")
    if media_type != "multipart/form-data" or not boundary:
        raise _invalid("the body must be multipart/form-data with a boundary")
    form = UploadForm()
    fields: dict[str, str] = {}
    parts = 0
    part: _Part | None = None
    try:
        parser = PushMultipartParser(boundary.encode("latin-1"))
        async for chunk in chunks:
            form.body_bytes += len(chunk)
            for event in parser.parse(chunk) if chunk else ():
                if isinstance(event, MultipartSegment):
                    parts += 1
                    if parts > part_limit:
                        raise _invalid(f"more than {part_limit} parts in the multipart body")
                    cap = max_image_bytes if event.name == "files" else MAX_FIELD_BYTES
                    part = _Part(event, len(form.files), cap)
                elif event and part is not None:
                    part.add(event)
                elif event is None and part is not None:
                    if part.name == "files":
                        form.files.append(await part.item(max_image_bytes))
                    elif part.name in _FIELDS:
                        if part.name in fields:
                            raise _invalid(f"the `{part.name}` field is given more than once")
                        fields[part.name] = part.text()
                    part = None
        if form.body_bytes:
            parser.close()  # raises if the body ended before its closing boundary
    except (ParserError, ParserLimitReached) as exc:
        raise _invalid(f"malformed multipart/form-data: {exc}") from None
    form.model = fields.get("model")
    encoding_format = fields.get("encoding_format", "float")
    if encoding_format not in _ENCODING_FORMATS:
        raise _invalid(f"`encoding_format` must be one of {', '.join(_ENCODING_FORMATS)}")
    form.encoding_format = cast(EncodingFormat, encoding_format)
    on_error = fields.get("on_error")
    if on_error is not None and on_error not in _ON_ERRORS:
        raise _invalid(f"`on_error` must be one of {', '.join(_ON_ERRORS)}")
    form.on_error = cast(OnError | None, on_error)
    return form


UPLOAD_SCHEMA = Schema(
    type=OpenAPIType.OBJECT,
    title="UploadForm",
    properties={
        "files": Schema(
            type=OpenAPIType.ARRAY,
            items=Schema(
                type=OpenAPIType.STRING,
                format=OpenAPIFormat.BINARY,
                content_media_type="application/octet-stream",
            ),
        ),
        "model": Schema(one_of=[Schema(type=OpenAPIType.STRING), Schema(type=OpenAPIType.NULL)]),
        "encoding_format": Schema(type=OpenAPIType.STRING, enum=list(_ENCODING_FORMATS), default="float"),
        "on_error": Schema(type=OpenAPIType.STRING, enum=list(_ON_ERRORS)),
    },
    required=[],
)
"""The form as Litestar described it when it read the body itself (a `data: UploadForm` parameter)."""


@dataclass
class UploadOperation(Operation):
    """The upload route's OpenAPI operation (`operation_class=`): Litestar's, plus the multipart
    body it cannot infer from a handler that reads the body itself."""

    def __post_init__(self) -> None:
        self.request_body = RequestBody(
            content={"multipart/form-data": OpenAPIMediaType(schema=UPLOAD_SCHEMA)}, required=True
        )
