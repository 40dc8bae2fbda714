"""The per-app objects: settings, metrics registry, tracer provider and the embedding service.

One `Runtime` belongs to one app instance, so two apps in one test process never share counts or
spans. `create_app` builds it (no threads yet); the app's lifespan calls `start`, which attaches
the span exporter and loads the model in the background, so `/healthz` answers at once and
`/readyz` turns 200 when the model is warm. `stop` drains and closes everything in reverse order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from opentelemetry.sdk.trace import SpanProcessor

from cliplens.pipeline.service import EmbeddingService
from cliplens.pipeline.storage_health import StorageStatus
from cliplens.settings import Settings
from cliplens.telemetry.http import build_meter_provider
from cliplens.telemetry.loop import LoopLagMonitor
from cliplens.telemetry.metrics import Metrics
from cliplens.telemetry.tracing import build_tracer_provider, start_export
from cliplens.vocabulary import NotReady, ShuttingDown

log = logging.getLogger(__name__)


class Runtime:
    """Everything one app instance owns; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        on_fatal: Callable[[BaseException], None] | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = Metrics(extremes_window_s=settings.extremes_window_s)
        self.tracer_provider = build_tracer_provider()
        self.meter_provider = build_meter_provider(self.metrics.registry)
        self.tracer = self.tracer_provider.get_tracer("cliplens")
        self.on_fatal = on_fatal
        self.on_ready = on_ready
        self.load_error: BaseException | None = None
        self._service: EmbeddingService | None = None
        self._loading: asyncio.Task[None] | None = None
        self._processor: SpanProcessor | None = None
        self.loop_lag = LoopLagMonitor(self.metrics)
        self.draining = False

    @property
    def ready(self) -> bool:
        return self._service is not None and not self.draining

    @property
    def storage_status(self) -> dict[str, StorageStatus]:
        """Each configured storage source's last check; empty until the service has started."""
        return dict(self._service.storage_health.status) if self._service is not None else {}

    def drain(self) -> None:
        """Start a graceful shutdown: readiness turns 503 and new work is refused from now on."""
        if not self.draining:
            log.info("draining: readiness is now 503 and new requests are refused")
            if self._service is not None:
                self._service.drain(self.settings.shutdown_grace_s)
        self.draining = True

    @property
    def service(self) -> EmbeddingService:
        """The service, for a new request; raises NotReady or ShuttingDown when there is none to give."""
        if self.draining:
            error = ShuttingDown()
            self.metrics.rejected_requests_total.labels(error.code).inc()
            raise error
        if self._service is None:
            reason = f": {self.load_error}" if self.load_error else ""
            raise NotReady(f"the model is not loaded yet{reason}")
        return self._service

    async def start(self) -> None:
        self._processor = start_export(self.tracer_provider, self.settings)
        self.loop_lag.start()
        self._loading = asyncio.get_running_loop().create_task(self._load(), name="cliplens-model-load")

    async def wait_ready(self) -> EmbeddingService:
        """Wait for the background load (for the CLI and tests); raise its error if it failed."""
        if self._loading is not None:
            await asyncio.shield(self._loading)
        return self.service

    async def _load(self) -> None:
        try:
            service = await EmbeddingService.start(self.settings, self.tracer, self.metrics, self.loop_lag)
            if self.on_ready is not None:
                self.on_ready()
            self._service = service
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self.load_error = exc
            log.critical("the service could not start: %s", exc)
            if self.on_fatal is not None:
                self.on_fatal(exc)

    async def stop(self) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loading
        if self._service is not None:
            await self._service.close()
            self._service = None
        await self.loop_lag.stop()
        self.tracer_provider.force_flush()
        self.meter_provider.shutdown()
        if self._processor is not None:
            self._processor.shutdown()
