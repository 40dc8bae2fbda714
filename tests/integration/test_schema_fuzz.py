"""Schemathesis against the service's own OpenAPI schema: no generated request gets a 5xx.

Requests are generated from /schema/openapi.json as the running server (uvicorn, in this process)
publishes it, both schema-conforming (positive) and deliberately malformed (negative), for every
operation: JSON embeddings requests, multipart uploads and the model list.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.result import Err, Ok

from cliplens.experiment.inprocess import InProcessService
from tests.conftest import local_settings

EXAMPLES = 250
"""Per generation mode, over all operations: about 5 s each on 2 cores with the tiny model."""


@pytest.fixture(scope="module")
def service_url(tiny_model: str, photo_dir: Path) -> Iterator[str]:
    with InProcessService(local_settings(tiny_model, photo_dir)) as url:
        yield url


@pytest.mark.parametrize(
    "mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"]
)
def test_no_generated_request_gets_a_server_error(service_url: str, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{service_url}/schema/openapi.json")
    results = list(schema.get_all_operations())
    assert not [r.err() for r in results if isinstance(r, Err)], "the published schema has invalid operations"
    operations = [r.ok() for r in results if isinstance(r, Ok)]
    assert {op.path for op in operations} == {
        "/v1/embeddings",
        "/v1/embeddings/upload",
        "/v1/models",
        "/v1/models/{model_id}",
    }
    seen: dict[str, set[int]] = {}
    session = requests.Session()

    @given(case=schema.as_strategy(mode), served_model=st.booleans())
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case[Any], served_model: bool) -> None:
        if served_model and isinstance(case.body, dict):
            # a random `model` is a 404 before any work: half the cases get past that check
            case.body.pop("model", None)
        response = case.call(base_url=service_url, session=session, timeout=60)
        seen.setdefault(case.operation.path, set()).add(response.status_code)
        assert response.status_code < 500, (
            f"{case.as_curl_command()}\n-> {response.status_code} {response.text}"
        )

    check()
    session.close()
    # the generated requests reached every operation that takes input, and some were served
    assert {"/v1/embeddings", "/v1/embeddings/upload"} <= set(seen), seen
    if mode == GenerationMode.POSITIVE:
        assert 200 in seen["/v1/embeddings"] and 200 in seen["/v1/embeddings/upload"], seen
    else:
        assert seen["/v1/embeddings"] & {400, 413, 422}, seen


def _nested(depth: int, kind: str, inside_input: bool) -> bytes:
    nested = "[" * depth + "]" * depth if kind == "array" else '{"a":' * depth + "1" + "}" * depth
    return (f'{{"input": {nested}}}' if inside_input else nested).encode()


deep_json = st.builds(_nested, st.integers(0, 5000), st.sampled_from(["array", "object"]), st.booleans())
"""JSON nested up to 5,000 levels (the decoder's recursion limit is about 1,000), which the schema
cannot express and schemathesis never generates."""


def _multipart(parts: list[tuple[str, str | None, bytes]]) -> bytes:
    body = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + ("" if filename is None else f'; filename="{filename}"')
        body += b"--fuzz\r\nContent-Disposition: " + disposition.encode() + b"\r\n\r\n" + content + b"\r\n"
    return body + b"--fuzz--\r\n"


binary_parts = st.lists(
    st.tuples(
        st.sampled_from(["files", "model", "encoding_format", "other", ""]),
        st.one_of(st.none(), st.just(""), st.text(max_size=12)),
        st.binary(max_size=600),
    ),
    max_size=6,
).map(_multipart)
"""Forms with parts with no filename or an empty one, binary text fields, odd names and filenames
(quotes and line breaks included, which break the part's header): what a hand-made client sends."""


def test_deep_json_and_binary_multipart_parts_never_get_a_server_error(service_url: str) -> None:
    session = requests.Session()
    seen: set[int] = set()

    @given(json_body=deep_json, form=binary_parts)
    @settings(max_examples=60, deadline=None, database=None, derandomize=True)
    def check(json_body: bytes, form: bytes) -> None:
        for path, body, content_type in (
            ("/v1/embeddings", json_body, "application/json"),
            ("/v1/embeddings/upload", form, "multipart/form-data; boundary=fuzz"),
        ):
            response = session.post(
                f"{service_url}{path}", data=body, headers={"content-type": content_type}, timeout=60
            )
            seen.add(response.status_code)
            assert response.status_code < 500, f"{path} {body[:200]!r} -> {response.text}"

    check()
    session.close()
    assert {200, 400} <= seen, seen
