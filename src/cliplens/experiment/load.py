"""Load scenarios: N images per request x C concurrent requests, and what each request reported.

A scenario sends C requests at once, each with N distinct photos, and records per request the
client-side latency, the `Server-Timing` stage windows, the trace id and the item outcomes. The
numbers the report prints are computed from these records only.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

_SCENARIO = re.compile(r"^\s*(\d+)\s*(?:x\s*(\d+))?\s*$")
_TIMING_ENTRY = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*;.*?dur=([0-9.]+)")


@dataclass(frozen=True)
class Scenario:
    """`images` per request, `concurrency` requests in flight at once."""

    images: int
    concurrency: int = 1

    @classmethod
    def parse(cls, text: str) -> Scenario:
        """`50` or `50x30` (images x concurrent requests)."""
        match = _SCENARIO.match(text)
        if match is None or int(match.group(1)) < 1 or int(match.group(2) or 1) < 1:
            raise ValueError(f"{text!r} is not a scenario; write IMAGES or IMAGESxCONCURRENCY, e.g. 50x30")
        return cls(int(match.group(1)), int(match.group(2) or 1))

    @property
    def name(self) -> str:
        if self.concurrency == 1:
            return f"{self.images} image" + ("s" if self.images > 1 else "")
        return f"{self.images} images x {self.concurrency} concurrent"

    @property
    def key(self) -> str:
        return f"{self.images}x{self.concurrency}"


STUDY_SCENARIOS = (Scenario(1), Scenario(50), Scenario(100), Scenario(50, 30))
"""The four scenarios of the study that started the project."""


@dataclass
class RequestRecord:
    """One request of a scenario, as the client saw it."""

    scenario: str
    images: int
    status: int
    latency_ms: float
    stages_ms: dict[str, float] = field(default_factory=dict)
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    trace_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_server_timing(header: str | None) -> dict[str, float]:
    """`load;dur=12.1, decode;dur=30.2, total;dur=42.3` -> {"load": 12.1, ...} in milliseconds."""
    timings: dict[str, float] = {}
    for entry in (header or "").split(","):
        match = _TIMING_ENTRY.match(entry)
        if match:
            timings[match.group(1)] = float(match.group(2))
    return timings


async def _one_request(
    client: httpx.AsyncClient, scenario: Scenario, names: Sequence[str], timeout_s: float
) -> RequestRecord:
    started = time.perf_counter()
    try:
        response = await client.post(
            "/v1/embeddings", json={"input": list(names), "encoding_format": "base64"}, timeout=timeout_s
        )
    except httpx.TransportError as exc:
        latency = (time.perf_counter() - started) * 1e3
        return RequestRecord(scenario.key, len(names), 0, latency, errors={type(exc).__name__: len(names)})
    latency = (time.perf_counter() - started) * 1e3
    record = RequestRecord(
        scenario=scenario.key,
        images=len(names),
        status=response.status_code,
        latency_ms=latency,
        stages_ms=parse_server_timing(response.headers.get("server-timing")),
        trace_id=response.headers.get("x-trace-id"),
    )
    if response.status_code == 200:
        body = response.json()
        record.ok = len(body["data"])
        for error in body["errors"]:
            record.errors[error["code"]] = record.errors.get(error["code"], 0) + 1
    else:
        record.errors[f"http_{response.status_code}"] = len(names)
    return record


async def run_scenario(
    client: httpx.AsyncClient,
    scenario: Scenario,
    photos: Sequence[str],
    rounds: int = 1,
    timeout_s: float = 600.0,
    on_request: Callable[[RequestRecord], None] | None = None,
) -> list[RequestRecord]:
    """Send `rounds` waves of `scenario.concurrency` simultaneous requests; photos are reused cyclically."""
    cycle = itertools.cycle(photos)
    records: list[RequestRecord] = []
    for _ in range(rounds):
        batches = [[next(cycle) for _ in range(scenario.images)] for _ in range(scenario.concurrency)]

        async def send(names: list[str]) -> RequestRecord:
            record = await _one_request(client, scenario, names, timeout_s)
            if on_request is not None:
                on_request(record)
            return record

        records.extend(await asyncio.gather(*(send(names) for names in batches)))
    return records
