"""GET /metrics: this app's registry in the format the scraper asks for.

Prometheus asks for OpenMetrics when exemplar storage is on; only that format carries the trace-id
exemplars, so the response follows the `Accept` header (prometheus_client's own negotiation).
"""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.di import NamedDependency
from prometheus_client.exposition import choose_encoder

from cliplens.runtime import Runtime


@get("/metrics", include_in_schema=False, sync_to_thread=False)
def metrics(request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]) -> Response[bytes]:
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    if content_type.startswith("text/"):  # Litestar appends the charset to text/* itself
        content_type = content_type.replace("; charset=utf-8", "")
    return Response(encoder(runtime.metrics.registry), media_type=content_type)
