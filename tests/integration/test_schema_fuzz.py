"""Schemathesis against the service's own OpenAPI schema: no generated request gets a 5xx.

Requests are generated from /schema/openapi.json as the running server (uvicorn, in this process)
publishes it, both schema-conforming (positive) and deliberately malformed (negative), for every
operation: JSON embeddings requests, multipart uploads and the model list.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from cliplens.experiment.inprocess import InProcessService
from cliplens.settings import Settings

EXAMPLES = 250
"""Per generation mode, over all operations: about 5 s each on 2 cores with the tiny model."""


@pytest.fixture(scope="module")
def service_url(tiny_model: str, photo_dir: Path) -> Iterator[str]:
    service = Settings(
        model=tiny_model, pretrained="none", image_root=photo_dir, cpu_workers=2, max_inputs=16
    )
    with InProcessService(service) as url:
        yield url


@pytest.mark.parametrize(
    "mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["positive", "negative"]
)
def test_no_generated_request_gets_a_server_error(service_url: str, mode: GenerationMode) -> None:
    schema = schemathesis.openapi.from_url(f"{service_url}/schema/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} == {"/v1/embeddings", "/v1/embeddings/upload", "/v1/models"}
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
    def check(case: schemathesis.Case, served_model: bool) -> None:
        if served_model and isinstance(case.body, dict):
            # a random `model` is a 422 before any work: half the cases get past that check
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
