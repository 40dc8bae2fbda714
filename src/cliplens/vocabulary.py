"""The words cliplens speaks, each defined once: stages, modalities, image sources, item errors,
request errors.

Everything else imports them from here: the pipeline raises them, telemetry labels metrics and
spans with them, the HTTP edge maps them to statuses (api/errors.py, one table), and the
experiment, the dashboard generator, the benchmarks and the tests iterate over them. This module
imports nothing from cliplens, so no arrow in the module graph points back up from it.

Adding a stage = a member of `Stage` + the code that times it + regenerating the generated files
(the Grafana dashboard). Adding an error = a member of `ErrorCode` or `RequestErrorCode` + its row
in api/errors.py (a test walks the table, so a missing row fails CI).
"""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    """The stages an image crosses, in order. The values are span names and metric labels.

    `cache` is crossed only while a cache is on (for inline bytes, after `load`); a cache hit
    crosses no other stage."""

    CACHE = "cache"
    """reference -> cached vector: the content's identity (storage metadata, file status, or a hash
    of inline bytes, which are loaded first) and the lookup; a hit skips every later stage"""
    LOAD = "load"
    """reference -> bytes (storage download, local read, inline data)"""
    DECODE = "decode"
    """bytes -> RGB pixels"""
    PREPROCESS = "preprocess"
    """pixels -> model tensor (texts: tokenising)"""
    EMBED = "embed"
    """tensor -> vector, in a batch shared across requests"""

    @property
    def has_own_work(self) -> bool:
        """Whether one image's work in this stage is its own (not a forward pass shared by a batch)."""
        return self is not Stage.EMBED


IMAGE_WORK_STAGES: tuple[Stage, ...] = tuple(stage for stage in Stage if stage.has_own_work)
"""The stages whose per-image work is observed (`embed` is timed per batch instead)."""
PIPELINE_STAGES: tuple[Stage, ...] = tuple(stage for stage in Stage if stage is not Stage.CACHE)
"""The stages that make a vector: what the study and the benchmark measure (their load skips the
embedding cache, so that every photo crosses all of them)."""


class Modality(StrEnum):
    """What an item is; the `modality` label and request field."""

    IMAGE = "image"
    TEXT = "text"


class Source(StrEnum):
    """Where an image's bytes come from: the `source` label of the download and storage families
    and the `cliplens.image.source` of its `load` event."""

    GCS = "gcs"
    LOCAL = "local"
    URL = "url"
    """an http(s) URL on an allowed host (pipeline/urls.py)"""
    INLINE = "inline"
    """bytes that came with the request (a data: URI or an uploaded file)"""


class ErrorCode(StrEnum):
    """Why an item produced no embedding. The values are a public contract: the client's
    `errors[].code`, the `outcome` label of `cliplens_images_total`, the stage span's status."""

    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    INVALID_REFERENCE = "invalid_reference"
    TOO_LARGE = "too_large"
    UNSUPPORTED_FORMAT = "unsupported_format"
    DECODE_FAILED = "decode_failed"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    TIMEOUT = "timeout"
    TEXT_TOO_LONG = "text_too_long"
    INTERNAL = "internal"
    """an unexpected failure in cliplens itself (a bug); logged with the trace id"""


class ItemError(Exception):
    """One item failed; the request goes on with the others."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ItemError({self.code.value!r}, {self.message!r})"


class RequestErrorCode(StrEnum):
    """Why a whole request was refused: the `error.code` of a 4xx/5xx body (api/errors.py maps
    each to its HTTP status). The values are a public contract."""

    INVALID_BODY = "invalid_body"
    BODY_TOO_LARGE = "body_too_large"
    EMPTY_INPUT = "empty_input"
    ITEM_ERRORS = "item_errors"
    """some items failed and the request asked for all or nothing (`on_error: fail`); the body's
    `error.errors` lists each failed item"""
    TOO_MANY_ITEMS = "too_many_items"
    MODEL_NOT_FOUND = "model_not_found"
    UNSUPPORTED_DIMENSIONS = "unsupported_dimensions"
    UNAUTHORIZED = "unauthorized"
    ROUTE_NOT_FOUND = "route_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    INVALID_REQUEST = "invalid_request"
    REQUEST_TIMEOUT = "request_timeout"
    OVERLOADED = "overloaded"
    MODEL_NOT_READY = "model_not_ready"
    SHUTTING_DOWN = "shutting_down"
    INTERNAL_ERROR = "internal_error"


class RequestError(Exception):
    """The whole request cannot be served; `code` says why (and decides the HTTP status)."""

    def __init__(self, code: RequestErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code.value!r}, {self.message!r})"


class Overloaded(RequestError):
    """Admitting the request would exceed the bound on work in flight."""

    def __init__(self, message: str) -> None:
        super().__init__(RequestErrorCode.OVERLOADED, message)


class NotReady(RequestError):
    """The model is still loading (or failed to load)."""

    def __init__(self, message: str) -> None:
        super().__init__(RequestErrorCode.MODEL_NOT_READY, message)


class ShuttingDown(RequestError):
    """SIGTERM arrived (or the model worker is closing): in-flight requests finish, new ones are refused."""

    def __init__(self, message: str = "the service is shutting down; retry on another replica") -> None:
        super().__init__(RequestErrorCode.SHUTTING_DOWN, message)
