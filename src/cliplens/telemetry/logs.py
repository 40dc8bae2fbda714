"""JSON log lines with trace ids: one object per line on stderr, via the standard logging module.

Each line holds `ts`, `level`, `logger` and `message`; inside a request also the `trace_id` and
`span_id` of the current span, so a log line found by grep leads to the same trace as the
`X-Trace-Id` header and the metric exemplars. Extra fields passed with `extra={...}` become keys of
the object, and a traceback is the `exception` key. Terminal colour codes are for terminals: uvicorn's
`color_message` (and any other extra field holding an ANSI escape) is left out, and escapes in the
message are removed, so the lines stay greppable and parseable by log pipelines.
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter as _LibraryJsonFormatter

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_CORE_KEYS = frozenset({"ts", "level", "logger", "message", "exception", "trace_id", "span_id"})


class JsonFormatter(_LibraryJsonFormatter):
    """python-json-logger's formatter, with cliplens's key names and the current trace and span ids."""

    def __init__(self) -> None:
        super().__init__(
            ("levelname", "name", "message"),
            rename_fields={"levelname": "level", "name": "logger", "exc_info": "exception"},
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        """Put `ts` first, lower-case the level, add the span's ids and drop colour-coded fields."""
        log_data["ts"] = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        super().add_fields(log_data, record, message_dict)
        log_data["level"] = record.levelname.lower()
        if isinstance(log_data.get("message"), str):
            log_data["message"] = _ANSI_ESCAPE.sub("", log_data["message"])
        for key in [k for k, v in log_data.items() if k not in _CORE_KEYS and _has_escape(v)]:
            del log_data[key]
        context = trace.get_current_span().get_span_context()
        if context.is_valid:
            log_data["trace_id"] = trace.format_trace_id(context.trace_id)
            log_data["span_id"] = trace.format_span_id(context.span_id)


def _has_escape(value: object) -> bool:
    return isinstance(value, str) and "\x1b" in value


def configure_logging(level: str = "INFO") -> None:
    """Route the root logger (and uvicorn's) to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
