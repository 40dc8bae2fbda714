"""Liveness and readiness probes: never traced, never throttled, always fast.

`/healthz` answers 200 as long as the process serves HTTP. `/readyz` answers 200 only once the
model is loaded and warmed up, and 503 (with the reason) before that or after a failed load.
"""

from __future__ import annotations

from litestar import Response, get
from litestar.di import NamedDependency
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE

from cliplens.api.schemas import Health
from cliplens.runtime import Runtime


@get("/healthz", include_in_schema=False, sync_to_thread=False)
def healthz() -> Health:
    return Health(status="ok")


@get("/readyz", include_in_schema=False, sync_to_thread=False)
def readyz(runtime: NamedDependency[Runtime]) -> Response[Health]:
    if runtime.ready:
        return Response(Health(status="ready"), status_code=HTTP_200_OK)
    if runtime.draining:
        detail = "shutting down"
    elif runtime.load_error:
        detail = f"model failed to load: {runtime.load_error}"
    else:
        detail = "model loading"
    return Response(Health(status="not_ready", detail=detail), status_code=HTTP_503_SERVICE_UNAVAILABLE)
