"""Request-level errors and their HTTP status codes, with one JSON body shape for all of them.

Item-level failures (one bad photo) are not errors here: they are entries of the 200 response's
`errors` list, with the pipeline's vocabulary (pipeline/errors.py). What this module handles is a
request that cannot be served at all: a malformed body, too many items, an unknown model, a missing
token, overload (429), a shutdown in progress, a model that is not loaded yet. Each becomes
`{"error": {"message", "type", "code"}}`, OpenAI's shape.
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_401_UNAUTHORIZED,
    HTTP_413_REQUEST_ENTITY_TOO_LARGE,
    HTTP_422_UNPROCESSABLE_ENTITY,
    HTTP_429_TOO_MANY_REQUESTS,
    HTTP_500_INTERNAL_SERVER_ERROR,
    HTTP_503_SERVICE_UNAVAILABLE,
)
from opentelemetry import trace

from cliplens.api.schemas import ErrorBody, ErrorDetail
from cliplens.pipeline.service import Overloaded
from cliplens.runtime import NotReady, ShuttingDown

log = logging.getLogger(__name__)


class RequestRejected(Exception):
    """The whole request is refused with `status`; `code` is a stable machine-readable reason."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def empty_input() -> RequestRejected:
    return RequestRejected(
        HTTP_422_UNPROCESSABLE_ENTITY, "empty_input", "`input` must hold at least one item"
    )


def too_many_items(count: int, limit: int) -> RequestRejected:
    return RequestRejected(
        HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        "too_many_items",
        f"{count} items is more than the {limit} this service accepts per request (CLIPLENS_MAX_INPUTS)",
    )


def unknown_model(asked: str, served: str) -> RequestRejected:
    return RequestRejected(
        HTTP_422_UNPROCESSABLE_ENTITY,
        "model_not_found",
        f"model {asked!r} is not served here; this serves {served!r}",
    )


def unauthorized() -> RequestRejected:
    return RequestRejected(
        HTTP_401_UNAUTHORIZED,
        "unauthorized",
        "a valid bearer token is required (Authorization: Bearer <token>)",
        headers={"WWW-Authenticate": 'Bearer realm="cliplens"'},
    )


def trace_headers() -> dict[str, str]:
    """`X-Trace-Id` of the current request span, so any response can be found in Jaeger."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"X-Trace-Id": trace.format_trace_id(context.trace_id)}


def _body(status: int, kind: str, code: str | None, message: str) -> Response[ErrorBody]:
    return Response(
        ErrorBody(error=ErrorDetail(message=message, type=kind, code=code)),
        status_code=status,
        headers=trace_headers(),
    )


def _kind(status: int) -> str:
    if status == HTTP_401_UNAUTHORIZED:
        return "authentication_error"
    if status == HTTP_503_SERVICE_UNAVAILABLE:
        return "service_unavailable"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def handle_rejected(_: Request[Any, Any, Any], exc: RequestRejected) -> Response[ErrorBody]:
    response = _body(exc.status, _kind(exc.status), exc.code, exc.message)
    response.headers.update(exc.headers)
    return response


def handle_not_ready(_: Request[Any, Any, Any], exc: NotReady) -> Response[ErrorBody]:
    response = _body(HTTP_503_SERVICE_UNAVAILABLE, "service_unavailable", "model_not_ready", str(exc))
    response.headers["Retry-After"] = "5"
    return response


def handle_shutting_down(_: Request[Any, Any, Any], exc: ShuttingDown) -> Response[ErrorBody]:
    response = _body(HTTP_503_SERVICE_UNAVAILABLE, "service_unavailable", "shutting_down", str(exc))
    response.headers["Retry-After"] = "1"
    return response


def handle_overloaded(_: Request[Any, Any, Any], exc: Overloaded) -> Response[ErrorBody]:
    response = _body(HTTP_429_TOO_MANY_REQUESTS, "rate_limit_error", "overloaded", str(exc))
    response.headers["Retry-After"] = "1"
    return response


def handle_validation(_: Request[Any, Any, Any], exc: ValidationException) -> Response[ErrorBody]:
    details = "; ".join(
        f"{item.get('key', '') or 'body'}: {item.get('message', '')}".strip()
        for item in (exc.extra if isinstance(exc.extra, list) else [])
        if isinstance(item, dict)
    )
    message = f"{exc.detail}: {details}" if details else str(exc.detail)
    return _body(HTTP_400_BAD_REQUEST, "invalid_request_error", "invalid_body", message)


def handle_http(_: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorBody]:
    code = "body_too_large" if exc.status_code == HTTP_413_REQUEST_ENTITY_TOO_LARGE else None
    return _body(exc.status_code, _kind(exc.status_code), code, str(exc.detail))


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    log.exception("unhandled error serving %s %s", request.method, request.url.path)
    return _body(
        HTTP_500_INTERNAL_SERVER_ERROR,
        "server_error",
        "internal_error",
        "internal error; see the service log",
    )


EXCEPTION_HANDLERS = {
    RequestRejected: handle_rejected,
    NotReady: handle_not_ready,
    ShuttingDown: handle_shutting_down,
    Overloaded: handle_overloaded,
    ValidationException: handle_validation,
    HTTPException: handle_http,
    Exception: handle_unexpected,
}
