"""Request-level errors and their HTTP status codes: one table, one body shape, one handler.

Item-level failures (one bad photo) are entries of an `errors` list, with the item vocabulary
(`ErrorCode` in vocabulary.py): in the 200 response with `on_error: partial`, or in the 422
`item_errors` answer with `on_error: fail` (`ItemsFailed`, the one request error that carries
them). Otherwise what this module handles is a request that cannot be served at all. Whatever
refuses it — the pipeline (`Overloaded`), the runtime (`NotReady`, `ShuttingDown`), a route, or
Litestar itself (a malformed body, a body too large, an unknown path) — ends up as a
`RequestErrorCode`, and `RESPONSES` decides its status, OpenAI-style `type` and headers. The body
is always `{"error": {"message", "type", "code"}}`, OpenAI's shape (plus `errors` for
`item_errors`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from opentelemetry import trace

from cliplens.api.schemas import ErrorBody, ErrorDetail, ItemErrorBody, echo
from cliplens.vocabulary import RequestError, RequestErrorCode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ErrorResponse:
    """How one request error is answered."""

    status: int
    type: str
    """OpenAI's error `type`, which its clients switch on."""
    headers: dict[str, str] = field(default_factory=dict)


_INVALID = "invalid_request_error"
_UNAVAILABLE = "service_unavailable"

RESPONSES: dict[RequestErrorCode, ErrorResponse] = {
    RequestErrorCode.INVALID_BODY: ErrorResponse(400, _INVALID),
    RequestErrorCode.INVALID_REQUEST: ErrorResponse(400, _INVALID),
    RequestErrorCode.UNSUPPORTED_DIMENSIONS: ErrorResponse(400, _INVALID),
    RequestErrorCode.UNAUTHORIZED: ErrorResponse(
        401, "authentication_error", {"WWW-Authenticate": 'Bearer realm="cliplens"'}
    ),
    RequestErrorCode.ROUTE_NOT_FOUND: ErrorResponse(404, _INVALID),
    RequestErrorCode.METHOD_NOT_ALLOWED: ErrorResponse(405, _INVALID),
    RequestErrorCode.REQUEST_TIMEOUT: ErrorResponse(408, _INVALID),
    RequestErrorCode.BODY_TOO_LARGE: ErrorResponse(413, _INVALID),
    RequestErrorCode.TOO_MANY_ITEMS: ErrorResponse(413, _INVALID),
    RequestErrorCode.EMPTY_INPUT: ErrorResponse(422, _INVALID),
    RequestErrorCode.ITEM_ERRORS: ErrorResponse(422, _INVALID),
    RequestErrorCode.MODEL_NOT_FOUND: ErrorResponse(404, _INVALID),  # OpenAI's status for it
    RequestErrorCode.OVERLOADED: ErrorResponse(429, "rate_limit_error", {"Retry-After": "1"}),
    RequestErrorCode.INTERNAL_ERROR: ErrorResponse(500, "server_error"),
    RequestErrorCode.MODEL_NOT_READY: ErrorResponse(503, _UNAVAILABLE, {"Retry-After": "5"}),
    RequestErrorCode.SHUTTING_DOWN: ErrorResponse(503, _UNAVAILABLE, {"Retry-After": "1"}),
}
"""Every request error code, answered. A test checks that no code is missing."""

_FROM_FRAMEWORK_STATUS: dict[int, RequestErrorCode] = {
    400: RequestErrorCode.INVALID_BODY,
    404: RequestErrorCode.ROUTE_NOT_FOUND,
    405: RequestErrorCode.METHOD_NOT_ALLOWED,
    413: RequestErrorCode.BODY_TOO_LARGE,
}
"""Litestar's own refusals (malformed JSON or multipart: 400, unknown path, ...) in our vocabulary."""


def trace_headers() -> dict[str, str]:
    """`X-Trace-Id` of the current request span, so any response can be found in Jaeger."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"X-Trace-Id": trace.format_trace_id(context.trace_id)}


class ItemsFailed(RequestError):
    """Some items failed and the request asked for all or nothing (`on_error: fail`): 422
    `item_errors`, the failed items in `error.errors`, and the headers the 200 would have had
    (Server-Timing, X-Trace-Id): the work done is in the log and the trace, not in the answer."""

    def __init__(self, errors: list[ItemErrorBody], items: int, headers: dict[str, str]) -> None:
        first = errors[0]
        message = (
            f"{len(errors)} of {items} items failed (the first: item {first.index}, {first.code}: "
            f"{first.message}); every failure is in `errors`"
        )
        if len(errors) < items:
            message += ". Send `on_error: partial` to get the other items' vectors anyway"
        super().__init__(RequestErrorCode.ITEM_ERRORS, message)
        self.errors = errors
        self.headers = headers


def error_response(error: RequestError, status: int | None = None) -> Response[ErrorBody]:
    """The JSON answer to `error` (with the framework's own `status` where it decided one)."""
    answer = RESPONSES[error.code]
    detail = ErrorDetail(message=error.message, type=answer.type, code=error.code.value)
    headers = {**answer.headers, **trace_headers()}
    if isinstance(error, ItemsFailed):
        detail.errors = error.errors
        headers.update(error.headers)
    return Response(ErrorBody(error=detail), status_code=status or answer.status, headers=headers)


def _validation_message(exc: ValidationException) -> str:
    details = "; ".join(
        f"{item.get('key', '') or 'body'}: {item.get('message', '')}".strip()
        for item in (exc.extra if isinstance(exc.extra, list) else [])
        if isinstance(item, dict)
    )
    return echo(f"{exc.detail}: {details}" if details else str(exc.detail))


def as_request_error(exc: Exception) -> tuple[RequestError, int | None]:
    """Any exception that reached the edge, in the request error vocabulary (+ a framework status)."""
    if isinstance(exc, RequestError):
        return exc, None
    if isinstance(exc, ValidationException):
        return RequestError(RequestErrorCode.INVALID_BODY, _validation_message(exc)), None
    if isinstance(exc, HTTPException):
        status = exc.status_code
        fallback = RequestErrorCode.INVALID_REQUEST if status < 500 else RequestErrorCode.INTERNAL_ERROR
        return RequestError(_FROM_FRAMEWORK_STATUS.get(status, fallback), str(exc.detail)), status
    return RequestError(RequestErrorCode.INTERNAL_ERROR, "internal error; see the service log"), None


def handle_error(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    """The one exception handler of the app."""
    error, status = as_request_error(exc)
    if error.code is RequestErrorCode.INTERNAL_ERROR and not isinstance(exc, (RequestError, HTTPException)):
        log.error("unhandled error serving %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(error, status)


EXCEPTION_HANDLERS = {Exception: handle_error}
