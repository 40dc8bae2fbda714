"""The one table of request errors: every code answered, every exception the service raises mapped."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import cast

import pytest
from litestar.exceptions import HTTPException, ValidationException

from cliplens import vocabulary
from cliplens.api.errors import RESPONSES, as_request_error, error_response
from cliplens.vocabulary import RequestError, RequestErrorCode


def test_every_request_error_code_has_a_status_and_a_type() -> None:
    assert set(RESPONSES) == set(RequestErrorCode)
    for code, answer in RESPONSES.items():
        assert 400 <= answer.status < 600, code
        assert answer.type, code


@pytest.mark.parametrize(
    "error_type",
    [
        member
        for _, member in inspect.getmembers(vocabulary, inspect.isclass)
        if issubclass(member, RequestError) and member is not RequestError
    ],
)
def test_every_request_error_the_service_raises_is_answered_with_its_own_code(
    error_type: type[RequestError],
) -> None:
    error = cast(Callable[[str], RequestError], error_type)("because")  # each subclass takes a message
    response = error_response(error)
    assert response.status_code == RESPONSES[error.code].status
    assert response.content.error.code == error.code.value
    assert response.content.error.message == "because"


@pytest.mark.parametrize(
    ("exc", "code", "status"),
    [
        (ValidationException("bad field"), RequestErrorCode.INVALID_BODY, None),
        (HTTPException(status_code=400, detail="Malformed JSON"), RequestErrorCode.INVALID_BODY, 400),
        (HTTPException(status_code=404, detail="no route"), RequestErrorCode.ROUTE_NOT_FOUND, 404),
        (HTTPException(status_code=405, detail="GET"), RequestErrorCode.METHOD_NOT_ALLOWED, 405),
        (HTTPException(status_code=413, detail="big"), RequestErrorCode.BODY_TOO_LARGE, 413),
        (HTTPException(status_code=415, detail="media"), RequestErrorCode.INVALID_REQUEST, 415),
        (HTTPException(status_code=502, detail="odd"), RequestErrorCode.INTERNAL_ERROR, 502),
        (KeyError("boom"), RequestErrorCode.INTERNAL_ERROR, None),
    ],
)
def test_framework_and_unexpected_exceptions_get_a_code(
    exc: Exception, code: RequestErrorCode, status: int | None
) -> None:
    error, framework_status = as_request_error(exc)
    assert error.code is code
    assert framework_status == status
    response = error_response(error, framework_status)
    assert response.status_code == (status or RESPONSES[code].status)
    assert response.content.error.code == code.value


def test_unexpected_exceptions_do_not_leak_their_text() -> None:
    error, _ = as_request_error(RuntimeError("secret path /etc/x"))
    assert "secret" not in error.message


def test_a_validation_message_never_echoes_a_huge_value_whole() -> None:
    huge = "x" * 100_000
    exc = ValidationException("Validation failed", extra=[{"key": "modality", "message": huge}])
    error, _ = as_request_error(exc)
    assert error.code is RequestErrorCode.INVALID_BODY
    assert len(error.message) < 300 and "characters)" in error.message
