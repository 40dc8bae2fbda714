"""Optional bearer-token authentication of the API routes (health probes and /metrics stay open).

With `CLIPLENS_API_TOKENS` unset nothing is checked. Otherwise every API route needs
`Authorization: Bearer <token>` naming one of the tokens, or answers 401. The presented token is
hashed and compared with every configured token's hash in constant time, without stopping at the
first match, so response time says nothing about how close a guess was or which token matched.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from litestar.connection import ASGIConnection
from litestar.handlers import BaseRouteHandler

from cliplens.vocabulary import RequestError, RequestErrorCode


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def token_matches(presented: str, tokens: tuple[str, ...]) -> bool:
    """Constant-time check of `presented` against all `tokens`."""
    candidate = _digest(presented)
    matched = False
    for token in tokens:
        matched |= hmac.compare_digest(candidate, _digest(token))
    return matched


def require_token(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Litestar guard: pass when no tokens are configured or the bearer token is one of them."""
    tokens: tuple[str, ...] = connection.app.state.runtime.settings.api_tokens
    if not tokens:
        return
    scheme, _, presented = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token_matches(presented.strip(), tokens):
        raise RequestError(
            RequestErrorCode.UNAUTHORIZED, "a valid bearer token is required (Authorization: Bearer <token>)"
        )
