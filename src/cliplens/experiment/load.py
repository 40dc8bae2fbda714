"""Load scenarios: N images per request x C concurrent requests, and what each request reported.

A scenario sends C requests at once, each with N photos, and records per request the client-side
send and receive times, the `Server-Timing` stage windows (the per-request scope), the per-image
queue and work milliseconds the service returns with `"timings": true` (the per-image scope), the
trace id and the item outcomes. Every number the report prints is computed from these records
only, and they are what results.json keeps, so any number can be recomputed later.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

_SCENARIO = re.compile(r"^\s*(\d+)\s*(?:[xX*]\s*(\d+))?\s*$")
_TIMING_ENTRY = re.compile(r"^\s*([A-Za-z0-9_+-]+)\s*;.*?dur=([0-9.]+)")


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
        images = f"{self.images} image" + ("s" if self.images > 1 else "")
        return images if self.concurrency == 1 else f"{images} x {self.concurrency} concurrent"

    @property
    def key(self) -> str:
        return f"{self.images}x{self.concurrency}"

    @property
    def in_flight(self) -> int:
        """Images the scenario puts in the service at once: what its stages' queues grow with."""
        return self.images * self.concurrency


STUDY_SCENARIOS = (Scenario(1), Scenario(50), Scenario(100), Scenario(50, 30))
"""The four scenarios of the study that started the project."""


@dataclass
class ItemTiming:
    """One image of a request: {stage: {"queue_ms": wait, "work_ms": work}}, as the service measured."""

    index: int
    stages: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class RequestRecord:
    """One request of a scenario, as the client saw it and as the service reported it.

    `sent_ms` and `done_ms` are client clock readings relative to the scenario's start, so the
    scenario's wall time (first request sent to last response) is recomputable from the records.
    """

    scenario: str
    images: int
    status: int
    latency_ms: float
    stages_ms: dict[str, float] = field(default_factory=dict)
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    trace_id: str | None = None
    round: int = 0
    sent_ms: float = 0.0
    done_ms: float = 0.0
    items: list[ItemTiming] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RequestRecord:
        fields = dict(data)
        fields["items"] = [ItemTiming(int(i["index"]), dict(i["stages"])) for i in data.get("items", [])]
        return cls(**fields)


def parse_server_timing(header: str | None) -> dict[str, float]:
    """`load;dur=12.1, decode;dur=30.2, total;dur=42.3` -> {"load": 12.1, ...} in milliseconds."""
    timings: dict[str, float] = {}
    for entry in (header or "").split(","):
        match = _TIMING_ENTRY.match(entry)
        if match:
            timings[match.group(1)] = float(match.group(2))
    return timings


def _item_timings(body: Mapping[str, Any]) -> list[ItemTiming]:
    items: list[ItemTiming] = []
    for entry in body.get("timings") or []:
        stages = {
            stage: {"queue_ms": float(value["queue_ms"]), "work_ms": float(value["work_ms"])}
            for stage, value in entry["stages"].items()
        }
        items.append(ItemTiming(int(entry["index"]), stages))
    return items


def request_body(names: Sequence[str], read_cache: bool = False) -> dict[str, Any]:
    """The `/v1/embeddings` body of every request the experiment sends.

    `"on_error": "partial"`: a photo that fails is an item error in a 200 answer, counted by code in
    the study's errors column, while the others are measured; under the service's default (`fail`)
    one bad photo would turn the whole request into a 422 and lose its timings. The embedding cache
    is skipped unless `read_cache`: the load reuses its photos, and a study of the pipeline must
    see every photo go through every stage."""
    return {
        "input": list(names),
        "modality": "image",
        "encoding_format": "base64",
        "timings": True,
        "cache": read_cache,
        "on_error": "partial",
    }


async def send_request(
    client: httpx.AsyncClient,
    scenario: Scenario,
    names: Sequence[str],
    timeout_s: float,
    origin: float | None = None,
    round_index: int = 0,
    read_cache: bool = False,
) -> RequestRecord:
    """POST one embeddings request (`request_body`) and record it; a transport failure is a record,
    not an exception."""
    origin = time.perf_counter() if origin is None else origin
    started = time.perf_counter()
    payload = request_body(names, read_cache)
    try:
        response = await client.post("/v1/embeddings", json=payload, timeout=timeout_s)
    except httpx.TransportError as exc:
        ended = time.perf_counter()
        return RequestRecord(
            scenario.key,
            len(names),
            0,
            (ended - started) * 1e3,
            errors={type(exc).__name__: len(names)},
            round=round_index,
            sent_ms=(started - origin) * 1e3,
            done_ms=(ended - origin) * 1e3,
        )
    ended = time.perf_counter()
    record = RequestRecord(
        scenario=scenario.key,
        images=len(names),
        status=response.status_code,
        latency_ms=(ended - started) * 1e3,
        stages_ms=parse_server_timing(response.headers.get("server-timing")),
        trace_id=response.headers.get("x-trace-id"),
        round=round_index,
        sent_ms=(started - origin) * 1e3,
        done_ms=(ended - origin) * 1e3,
    )
    if response.status_code == 200:
        body = response.json()
        record.ok = len(body["data"])
        for error in body["errors"]:
            record.errors[error["code"]] = record.errors.get(error["code"], 0) + 1
        record.items = _item_timings(body)
    else:
        record.errors[f"http_{response.status_code}"] = len(names)
    return record


def batches(scenario: Scenario, references: Sequence[str], rounds: int) -> Iterator[list[list[str]]]:
    """Per round, the references of each concurrent request; photos are reused cyclically.

    A request never holds the same photo twice while the corpus is at least `scenario.images`
    long; successive requests continue the cycle, so concurrent requests load different photos
    as far as the corpus allows.
    """
    cycle = itertools.cycle(references)
    for _ in range(rounds):
        yield [[next(cycle) for _ in range(scenario.images)] for _ in range(scenario.concurrency)]


async def run_scenario(
    client: httpx.AsyncClient,
    scenario: Scenario,
    photos: Sequence[str],
    rounds: int = 1,
    timeout_s: float = 600.0,
    on_request: Callable[[RequestRecord], None] | None = None,
    read_cache: bool = False,
) -> list[RequestRecord]:
    """Send `rounds` waves of `scenario.concurrency` simultaneous requests, one wave after the other
    (with or without reading the service's embedding cache: `send_request`)."""
    origin = time.perf_counter()
    records: list[RequestRecord] = []
    for round_index, wave in enumerate(batches(scenario, photos, rounds)):

        async def send(names: list[str], round_index: int = round_index) -> RequestRecord:
            record = await send_request(client, scenario, names, timeout_s, origin, round_index, read_cache)
            if on_request is not None:
                on_request(record)
            return record

        records.extend(await asyncio.gather(*(send(names) for names in wave)))
    return records
