"""create_app(settings) -> Litestar. Wiring only: routes, plugins, lifespan.

The HTTP server span and the HTTP request metric come from Litestar's own OpenTelemetry plugin
(no separate send/receive spans; probes and /metrics are neither traced nor counted), on this
app's tracer and meter providers (telemetry/http.py: stable conventions, spans named by route
template); the stage spans the pipeline creates are its children.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from litestar import Litestar, Router
from litestar.config.compression import CompressionConfig
from litestar.config.cors import CORSConfig
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.plugins.opentelemetry import OpenTelemetryConfig, OpenTelemetryPlugin

from cliplens import __version__
from cliplens.api.auth import require_token
from cliplens.api.embeddings import EmbeddingsController
from cliplens.api.errors import EXCEPTION_HANDLERS
from cliplens.api.health import healthz, readyz
from cliplens.api.metrics import metrics
from cliplens.api.models import list_models, retrieve_model
from cliplens.api.requests import CliplensRequest
from cliplens.runtime import Runtime
from cliplens.settings import Settings
from cliplens.telemetry.http import opt_into_stable_conventions, route_details

UNTRACED_PATHS = ["^/metrics", "^/healthz", "^/readyz"]


EXPOSED_HEADERS = ["X-Trace-Id", "Server-Timing", "X-Cache-Hits", "Retry-After"]
"""Response headers a browser page may read: the trace to look up, the stage times, the cache's
hits, when to retry."""


def cors(settings: Settings) -> CORSConfig | None:
    """Browsers on `CLIPLENS_CORS_ORIGINS` may call the API (with a bearer token: no cookies)."""
    if not settings.cors_origins:
        return None
    return CORSConfig(
        allow_origins=list(settings.cors_origins),
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type"],
        expose_headers=EXPOSED_HEADERS,
        max_age=600,
    )


def compression(settings: Settings) -> CompressionConfig | None:
    """gzip for responses of at least `CLIPLENS_GZIP_MIN_BYTES`, at level 1: float JSON shrinks only
    about 2x at any level, and level 9 costs the event loop ~14x level 1's time."""
    if not settings.gzip_min_bytes:
        return None
    return CompressionConfig(backend="gzip", minimum_size=settings.gzip_min_bytes, gzip_compress_level=1)


def create_app(
    settings: Settings,
    on_fatal: Callable[[BaseException], None] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> Litestar:
    """Build the app; `on_fatal` is called if the model cannot be loaded (the CLI exits then),
    `on_ready` once it is loaded and warm (the server settles its heap then)."""
    opt_into_stable_conventions()
    runtime = Runtime(settings, on_fatal=on_fatal, on_ready=on_ready)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncIterator[None]:
        await runtime.start()
        try:
            yield
        finally:
            await runtime.stop()

    def provide_runtime() -> Runtime:
        return runtime

    tracing = OpenTelemetryConfig(
        tracer_provider=runtime.tracer_provider,
        meter_provider=runtime.meter_provider,
        scope_span_details_extractor=route_details,
        exclude=UNTRACED_PATHS,
        exclude_spans=["receive", "send"],
    )
    app = Litestar(
        route_handlers=[
            Router(
                path="/",
                route_handlers=[EmbeddingsController, list_models, retrieve_model],
                guards=[require_token],
            ),
            healthz,
            readyz,
            metrics,
        ],
        dependencies={"runtime": Provide(provide_runtime, sync_to_thread=False)},
        plugins=[OpenTelemetryPlugin(tracing)],
        middleware=[tracing.middleware],
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        request_max_body_size=settings.max_body_bytes,
        request_class=CliplensRequest,
        cors_config=cors(settings),
        compression_config=compression(settings),
        logging_config=None,
        openapi_config=OpenAPIConfig(title="cliplens", version=__version__, path="/schema"),
    )
    app.state.runtime = runtime
    return app
