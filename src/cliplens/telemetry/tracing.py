"""Tracing set-up: one TracerProvider per app, its exporter started and stopped by the lifespan.

The provider itself holds no thread, so `create_app` builds it (Litestar's OpenTelemetry plugin
needs it when the app is assembled). The OTLP exporter and its batch span processor, which do own a
thread, are attached in the lifespan by `start_export` and flushed on shutdown, so a forked worker
never inherits a dead exporter thread. With no endpoint configured nothing is exported, yet spans
and trace ids still exist in-process (for `X-Trace-Id`, exemplars and log lines) at little cost.
"""

from __future__ import annotations

import logging
import os
import socket

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)

from cliplens.settings import Settings

log = logging.getLogger(__name__)


def build_sampler(name: str, ratio: float | None) -> Sampler:
    """The sampler for an `OTEL_TRACES_SAMPLER` name (the SDK's standard names)."""
    fixed: dict[str, Sampler] = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "parentbased_always_on": DEFAULT_ON,
        "parentbased_always_off": DEFAULT_OFF,
    }
    if name in fixed:
        return fixed[name]
    rate = 1.0 if ratio is None else min(max(ratio, 0.0), 1.0)
    if name == "traceidratio":
        return TraceIdRatioBased(rate)
    if name == "parentbased_traceidratio":
        return ParentBasedTraceIdRatio(rate)
    raise ValueError(f"OTEL_TRACES_SAMPLER={name!r} is not a sampler cliplens knows")


def build_tracer_provider(settings: Settings) -> TracerProvider:
    """A provider with the service's resource and sampler, and no processor yet."""
    attributes: dict[str, str] = dict(settings.resource_attributes)
    attributes["service.name"] = settings.service_name
    # Replicas must be told apart in traces; Kubernetes sets this from the pod name.
    attributes.setdefault("service.instance.id", f"{socket.gethostname()}-{os.getpid()}")
    return TracerProvider(
        resource=Resource.create(attributes),
        sampler=build_sampler(settings.traces_sampler, settings.traces_sampler_arg),
    )


def build_exporter(settings: Settings) -> SpanExporter | None:
    """The OTLP exporter the settings ask for, or None when no endpoint is set."""
    if settings.otlp_protocol == "grpc":
        endpoint = settings.otlp_traces_endpoint or settings.otlp_endpoint
        if endpoint is None:
            return None
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    endpoint = settings.otlp_traces_endpoint
    if endpoint is None and settings.otlp_endpoint is not None:
        endpoint = settings.otlp_endpoint.rstrip("/") + "/v1/traces"
    if endpoint is None:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=endpoint)


def start_export(provider: TracerProvider, settings: Settings) -> SpanProcessor | None:
    """Attach a batch span processor with the OTLP exporter; None when there is nowhere to send."""
    exporter = build_exporter(settings)
    if exporter is None:
        log.info("no OTLP endpoint configured: spans are created in-process but not exported")
        return None
    processor = BatchSpanProcessor(exporter)
    provider.add_span_processor(processor)
    log.info("exporting traces over OTLP", extra={"protocol": settings.otlp_protocol})
    return processor
