"""Liveness and readiness probes: never traced, never throttled, always fast.

`/healthz` answers 200 as long as the process serves HTTP. `/readyz` answers 200 only once the
model is loaded and warmed up, and 503 (with the reason) before that or after a failed load; its
body also says how each storage source fared in its last check, and with
`CLIPLENS_READY_REQUIRES_STORAGE=1` a source that failed it makes the answer 503 too.
"""

from __future__ import annotations

from litestar import Response, get
from litestar.di import NamedDependency
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE

from cliplens.api.schemas import Health, Readiness, StorageCheck
from cliplens.runtime import Runtime


@get("/healthz", include_in_schema=False, sync_to_thread=False)
def healthz() -> Health:
    return Health(status="ok")


@get("/readyz", include_in_schema=False, sync_to_thread=False)
def readyz(runtime: NamedDependency[Runtime]) -> Response[Readiness]:
    checks = runtime.storage_status
    storage = {source: StorageCheck(up=status.up, detail=status.detail) for source, status in checks.items()}
    down = [status.detail for status in checks.values() if not status.up]
    if runtime.ready and not (down and runtime.settings.ready_requires_storage):
        return Response(Readiness(status="ready", storage=storage), status_code=HTTP_200_OK)
    if runtime.ready:
        detail = f"storage check failed: {'; '.join(down)}"
    elif runtime.draining:
        detail = "shutting down"
    elif runtime.load_error:
        detail = f"model failed to load: {runtime.load_error}"
    else:
        detail = "model loading"
    return Response(
        Readiness(status="not_ready", detail=detail, storage=storage),
        status_code=HTTP_503_SERVICE_UNAVAILABLE,
    )
