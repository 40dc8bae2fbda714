import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from cliplens.telemetry.logs import JsonFormatter


def record(message: str, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("cliplens.test", logging.INFO, __file__, 1, message, (), None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_a_log_line_is_one_json_object_with_extra_fields() -> None:
    line = JsonFormatter().format(record("model loaded", model="ViT-B-32/random", dim=512))
    payload = json.loads(line)
    assert "\n" not in line
    assert payload["message"] == "model loaded"
    assert payload["level"] == "info"
    assert payload["model"] == "ViT-B-32/random"
    assert payload["dim"] == 512
    assert "trace_id" not in payload


def test_inside_a_span_the_line_carries_its_trace_and_span_ids() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("request") as span:
        payload = json.loads(JsonFormatter().format(record("inside")))
        context = span.get_span_context()
    assert payload["trace_id"] == f"{context.trace_id:032x}"
    assert payload["span_id"] == f"{context.span_id:016x}"
