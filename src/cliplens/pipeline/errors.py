"""The one error vocabulary of an item (one image or text of a request).

An `ItemError` carries an `ErrorCode`; the code is what the client sees in `errors[].code`, the
`outcome` label of `cliplens_images_total`, and the status of the stage span where it happened.
Every failure of an item is turned into one of these codes at the stage that saw it, so one bad
photo never fails the others.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Why an item produced no embedding. The values are a public contract."""

    NOT_FOUND = "not_found"
    FORBIDDEN = "forbidden"
    INVALID_REFERENCE = "invalid_reference"
    TOO_LARGE = "too_large"
    UNSUPPORTED_FORMAT = "unsupported_format"
    DECODE_FAILED = "decode_failed"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    TIMEOUT = "timeout"


class ItemError(Exception):
    """One item failed; the request goes on with the others."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"ItemError({self.code.value!r}, {self.message!r})"
