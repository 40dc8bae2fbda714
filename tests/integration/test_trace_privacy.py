"""A text request leaves no text in the traces: its events carry a length and a hash, the text
itself only when the operator asks for it (`CLIPLENS_TRACE_TEXT=1`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from opentelemetry.sdk.trace import ReadableSpan

from cliplens.settings import Settings, load_settings
from tests.integration.test_client_spans import traced

TEXTS = ["a photo of my daughter Mathilde at Lac Léman", "the receipt from Dr. Okafor's clinic"]
TOO_LONG = "my home address is 14 Rue des Lilas, 69003 Lyon, and the door code is 4172"
"""Longer than the cap below: refused with `text_too_long`, and never echoed in a trace."""


def text_events(spans: list[ReadableSpan]) -> dict[int, dict[str, object]]:
    """{index: attributes} of the per-text events of the `embed` span."""
    (embed,) = [s for s in spans if s.name == "embed"]
    return {
        int(e.attributes["cliplens.text.index"]): dict(e.attributes)  # type: ignore[arg-type]
        for e in embed.events
        if e.attributes is not None
    }


@pytest.mark.parametrize("trace_text", [False, True])
def test_a_text_request_puts_no_text_in_any_span_unless_asked(settings: Settings, trace_text: bool) -> None:
    limited = dataclasses.replace(settings, max_text_chars=60, trace_text=trace_text)
    with traced(limited) as (client, exporter):
        response = client.post("/v1/embeddings", json={"input": [*TEXTS, TOO_LONG], "modality": "text"})
        spans = list(exporter.get_finished_spans())
    assert response.status_code == 200, response.text
    assert [e["code"] for e in response.json()["errors"]] == ["text_too_long"]
    trace_id = int(response.headers["x-trace-id"], 16)
    in_trace = [s for s in spans if s.context.trace_id == trace_id]
    assert {"preprocess", "cache", "embed"} <= {s.name for s in in_trace}
    assert any(s.name == "embed batch" for s in spans)

    events = text_events(in_trace)
    assert sorted(events) == [0, 1]
    for index, text in enumerate(TEXTS):
        assert events[index]["cliplens.text.length"] == len(text)
        assert events[index]["cliplens.text.sha256"] == hashlib.sha256(text.encode()).hexdigest()[:16]
        assert events[index].get("cliplens.text.content") == (text if trace_text else None)
    for span in in_trace:
        for event in span.events:
            assert event.name == "text", (span.name, event.name)
    # every span the app ended, in any trace, as text (to_json escapes "é")
    everything = "\n".join(json.dumps(json.loads(span.to_json()), ensure_ascii=False) for span in spans)
    assert TOO_LONG not in everything and "Rue des Lilas" not in everything
    for text in TEXTS:
        assert (text in everything) is trace_text


def test_trace_text_is_read_from_the_environment() -> None:
    assert load_settings({}).trace_text is False
    assert load_settings({"CLIPLENS_TRACE_TEXT": "1"}).trace_text is True
