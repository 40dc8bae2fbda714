"""The HTTP server's own telemetry: every response counted, server spans named by route template.

The server span and the HTTP metric come from the same place, OpenTelemetry's ASGI middleware
(through Litestar's OpenTelemetry plugin), so one measurement feeds both. This module supplies what
that middleware cannot know on its own:

- **Stable conventions.** The instrumentation picks old or stable HTTP attribute names from
  `OTEL_SEMCONV_STABILITY_OPT_IN`, process-wide, the first time a middleware is built; cliplens
  opts into `http` (stable names only: `http.request.method`, `http.response.status_code`,
  `client.address`, `http.route`) unless the operator chose otherwise.
- **The route template.** The middleware names the span before Litestar has routed the request,
  and Litestar's default names it after the raw path, so every 404 probe became a new span name
  (unbounded cardinality in Jaeger's span metrics). `route_details` asks the app's own router (its
  cached lookup) for the template: `POST /v1/embeddings`, `http.route=/v1/embeddings`; a path no
  route matches is named by its method alone and carries no `http.route`, as the conventions say.
- **The metric on this app's registry.** `http.server.request.duration` (a histogram in seconds,
  on the latency buckets of the stage histograms) is exported by OpenTelemetry's Prometheus reader
  onto the app's own `CollectorRegistry`: `http_server_request_duration_seconds{http_request_method,
  http_route, http_response_status_code}` on `/metrics`, next to the cliplens families, with
  `http_server_active_requests`. The probes and `/metrics` itself are excluded, like their spans.
"""

from __future__ import annotations

import os
from typing import Any

from litestar.utils import normalize_path
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
from opentelemetry.semconv.attributes.http_attributes import HTTP_ROUTE
from prometheus_client import CollectorRegistry

from cliplens.telemetry.metrics import LATENCY_BUCKETS

STABILITY_OPT_IN = "OTEL_SEMCONV_STABILITY_OPT_IN"
REQUEST_DURATION = "http.server.request.duration"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
"""Other methods are named `HTTP` in span names (the conventions' `_OTHER`), never echoed."""


def opt_into_stable_conventions() -> None:
    """Ask the instrumentation for the stable HTTP conventions unless the operator chose a mode.

    The instrumentation reads this variable itself, once per process; there is no other way to
    tell it, so this is the one place cliplens writes to the environment.
    """
    os.environ.setdefault(STABILITY_OPT_IN, "http")


def route_details(scope: Any) -> tuple[str, dict[str, str]]:
    """The server span's name and `http.route`, from the route template the app will route to."""
    method = str(scope.get("method", "")).upper()
    name = method if method in KNOWN_METHODS else "HTTP"
    app = scope.get("litestar_app")
    if app is None or scope.get("type") != "http":
        return name, {}
    try:
        *_, template = app.asgi_router.handle_routing(path=normalize_path(scope["path"]), method=method)
    except Exception:  # no route (404) or not this method (405): named by the method alone
        return name, {}
    return f"{name} {template}", {HTTP_ROUTE: template}


def build_meter_provider(registry: CollectorRegistry) -> MeterProvider:
    """A meter provider whose metrics are read onto `registry` at each scrape of `/metrics`."""
    reader = PrometheusMetricReader(disable_target_info=True, scope_info_enabled=False, registry=registry)
    seconds = View(
        instrument_name=REQUEST_DURATION,
        aggregation=ExplicitBucketHistogramAggregation(boundaries=LATENCY_BUCKETS),
    )
    return MeterProvider(metric_readers=[reader], views=[seconds])
