import json
import logging
import sys

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


def test_uvicorn_colour_codes_stay_out_of_the_line() -> None:
    rec = record("Uvicorn running on %s", color_message="Uvicorn running on \x1b[1m%s\x1b[0m", port=8000)
    rec.args = ("http://127.0.0.1:8000",)
    line = JsonFormatter().format(rec)
    payload = json.loads(line)
    assert "color_message" not in payload
    assert "\\u001b" not in line and "\x1b" not in line
    assert payload["message"] == "Uvicorn running on http://127.0.0.1:8000"
    assert payload["port"] == 8000


def test_any_coloured_extra_field_is_dropped_and_a_coloured_message_is_cleaned() -> None:
    payload = json.loads(
        JsonFormatter().format(record("\x1b[31mred\x1b[0m alert", styled="\x1b[1mbold", n=1))
    )
    assert payload["message"] == "red alert"
    assert "styled" not in payload
    assert payload["n"] == 1


def test_a_logged_exception_is_the_exception_key_and_the_line_keeps_its_keys() -> None:
    try:
        raise RuntimeError("model forward pass failed")
    except RuntimeError:
        rec = logging.LogRecord("cliplens.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    payload = json.loads(JsonFormatter().format(rec))
    assert list(payload)[:4] == ["ts", "level", "logger", "message"]
    assert payload["level"] == "error"
    assert payload["logger"] == "cliplens.test"
    assert payload["ts"].endswith("+00:00")
    assert "RuntimeError: model forward pass failed" in payload["exception"]
    assert "exc_info" not in payload
