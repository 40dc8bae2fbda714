"""Tracing set-up: the OpenTelemetry SDK reads its own variables, cliplens only adds its defaults."""

from __future__ import annotations

import dataclasses

import pytest
from opentelemetry.sdk.trace.export import ConsoleSpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import NoOpTracer

from cliplens.settings import Settings
from cliplens.telemetry.tracing import build_exporter, build_tracer_provider

OTEL_VARIABLES = (
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_SDK_DISABLED",
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def test_without_variables_the_service_is_cliplens_with_an_instance_id() -> None:
    attributes = build_tracer_provider().resource.attributes
    assert attributes["service.name"] == "cliplens"
    assert attributes["service.instance.id"]  # replicas are told apart (the SDK's UUID, or host-pid)


def test_the_sdk_reads_service_name_resource_attributes_and_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "embedder")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=pod-7,team=photos")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    provider = build_tracer_provider()
    attributes = provider.resource.attributes
    assert (attributes["service.name"], attributes["service.instance.id"], attributes["team"]) == (
        "embedder",
        "pod-7",
        "photos",
    )
    assert isinstance(provider.sampler, TraceIdRatioBased) and provider.sampler.rate == 0.25


def test_sdk_disabled_gives_tracers_that_record_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert isinstance(build_tracer_provider().get_tracer("cliplens"), NoOpTracer)


def test_the_exporter_follows_otel_traces_exporter_and_needs_an_endpoint_for_otlp() -> None:
    settings = Settings()
    assert build_exporter(settings) is None  # no endpoint: spans stay in-process
    assert isinstance(
        build_exporter(dataclasses.replace(settings, traces_exporter="console")), ConsoleSpanExporter
    )
    with_endpoint = dataclasses.replace(settings, otlp_endpoint="http://127.0.0.1:4318")
    assert build_exporter(with_endpoint) is not None
    assert build_exporter(dataclasses.replace(with_endpoint, traces_exporter="none")) is None
