"""Tracing set-up: one TracerProvider per app, its exporter started and stopped by the lifespan.

The provider itself holds no thread, so `create_app` builds it (Litestar's OpenTelemetry plugin
needs it when the app is assembled). The OTLP exporter and its batch span processor, which do own a
thread, are attached in the lifespan by `start_export` and flushed on shutdown, so a forked worker
never inherits a dead exporter thread. With no endpoint configured nothing is exported, yet spans
and trace ids still exist in-process (for `X-Trace-Id`, exemplars and log lines) at little cost.

The OpenTelemetry SDK reads its own standard variables, and cliplens leaves them to it: the sampler
(`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`), the resource (`OTEL_SERVICE_NAME`,
`OTEL_RESOURCE_ATTRIBUTES`), `OTEL_SDK_DISABLED`, and the exporter's headers, certificates,
compression and timeouts. What cliplens adds is only what the SDK does not do: `cliplens` as the
service name where none is set, a `service.instance.id` that tells replicas apart, no export at all
while no endpoint is set (the SDK would try localhost:4318 and log failures), and the choice of
exporter from `OTEL_TRACES_EXPORTER` and the OTLP protocol (the SDK does that only under
`opentelemetry-instrument`).
"""

from __future__ import annotations

import logging
import os
import socket

from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from cliplens.settings import Settings

log = logging.getLogger(__name__)
DEFAULT_SERVICE_NAME = "cliplens"


def build_resource() -> Resource:
    """The SDK's resource (its detectors and variables), with cliplens' defaults where it has none."""
    resource = Resource.create()
    defaults: dict[str, str] = {}
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        defaults[SERVICE_NAME] = DEFAULT_SERVICE_NAME
    if SERVICE_INSTANCE_ID not in resource.attributes:
        # Replicas must be told apart in traces; Kubernetes sets this from the pod name, and
        # recent SDKs default to a UUID; older ones (which cliplens still accepts) to nothing.
        defaults[SERVICE_INSTANCE_ID] = f"{socket.gethostname()}-{os.getpid()}"
    return resource.merge(Resource(defaults))


def build_tracer_provider() -> TracerProvider:
    """A provider with the SDK's sampler and resource, and no processor yet."""
    return TracerProvider(resource=build_resource())


def build_exporter(settings: Settings) -> SpanExporter | None:
    """The exporter the settings ask for, or None (no endpoint set, or `OTEL_TRACES_EXPORTER=none`)."""
    if settings.traces_exporter == "none":
        return None
    if settings.traces_exporter == "console":
        return ConsoleSpanExporter()
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
