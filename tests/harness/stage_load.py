"""The load the Prometheus tests send: closed-loop clients at concurrency 1, 2, 4 and 8, each level
separated by a pause, every `Server-Timing` header and per-image `timings` body kept.

What the client saw (`Run`) is what Prometheus is then held to (tests/harness/dashboards.py). The
service must run with `extremes_window_s=EXTREMES_WINDOW_S` for the per-level extremes to hold.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from cliplens.experiment.corpus import distinct_copy, encode_jpeg, render_photo
from tests.harness.prometheus import SCRAPE_S, PrometheusServer

# The service's min/max window, shortened from its 15 s default so that each concurrency level
# can be checked on its own: a level starts more than a window after the previous one ended, so
# min_over_time over the level's span sees only its own observations (the gauges of
# [span start - window, span end]). 4 s still exceeds the 1 s scrape interval by enough that
# every observation is scraped at least once (each stays visible for 3 to 4 s), even when a
# scrape of the busy service is late.
EXTREMES_WINDOW_S = 4.0
PAUSE_S = EXTREMES_WINDOW_S + 1.5
LEVELS = (1, 2, 4, 8)
REQUESTS_PER_WORKER = int(os.environ.get("CLIPLENS_TEST_REQUESTS_PER_WORKER", "3"))
"""Requests each closed-loop client sends per level; raise it for a denser picture (docs/)."""
PHOTOS = ("album/1/a.jpg", "album/1/b.jpg", "album/2/c.jpg")
"""Sent in every image request: every other request reads the embedding cache (and they are hits
after their first time), the others skip it (and they cross every stage again)."""
MISSING = "album/missing.jpg"
_NEW_PHOTO = encode_jpeg(render_photo(11, 1024, 768))
_copies = itertools.count()


def new_photo() -> str:
    """A data URI of a photo never sent before, so every image request also crosses every stage
    (inline bytes: load, then the cache's lookup, a miss, then decode, preprocess and embed)."""
    data = distinct_copy(_NEW_PHOTO, next(_copies))
    return "data:image/jpeg;base64," + base64.b64encode(data).decode()


TEXT = "a photo of mountains at sunset"


@dataclass
class Sent:
    """One request of the load, as the client saw it."""

    level: int
    modality: str
    stages_s: dict[str, float]
    images: list[dict[str, dict[str, float]]]
    trace_id: str
    failed: int = 0
    """Items of the request that got an error."""


@dataclass
class Level:
    concurrency: int
    started: float
    ended: float = 0.0
    sent: list[Sent] = field(default_factory=list)


@dataclass
class Run:
    prometheus: PrometheusServer
    target: str
    levels: list[Level]
    start: float
    end: float
    """The timestamp of the last scrape: range queries that end here have no extrapolation."""

    @property
    def sent(self) -> list[Sent]:
        return [s for level in self.levels for s in level.sent]


def server_timing_s(header: str) -> dict[str, float]:
    return {name: float(ms) / 1e3 for name, ms in re.findall(r"(\w+);dur=([0-9.]+)", header)}


async def _worker(client: httpx.AsyncClient, level: Level, index: int) -> None:
    for i in range(REQUESTS_PER_WORKER):
        turn = index * REQUESTS_PER_WORKER + i
        if index == 0 and i == REQUESTS_PER_WORKER - 1:  # one text request per level
            body: dict[str, Any] = {"input": [TEXT], "modality": "text"}
        else:
            reads = turn % 2 == 0
            # as much work per request as before the cache (3-4 photos through every stage): the
            # KEDA test needs images in flight when Prometheus scrapes
            inputs = [*PHOTOS, new_photo(), new_photo(), *([MISSING] if reads else [])]
            body = {"input": inputs, "encoding_format": "base64", "timings": True, "cache": reads}
        response = await client.post("/v1/embeddings", json=body)
        assert response.status_code == 200, response.text
        payload = response.json()
        level.sent.append(
            Sent(
                level=level.concurrency,
                modality=body.get("modality", "image"),
                stages_s=server_timing_s(response.headers["server-timing"]),
                images=[
                    {stage: {k: v / 1e3 for k, v in t.items()} for stage, t in item["stages"].items()}
                    for item in payload.get("timings", [])
                ],
                trace_id=response.headers["x-trace-id"],
                failed=len(payload.get("errors", [])),
            )
        )


def _wait_for_scrape(prometheus: PrometheusServer, requests: int) -> None:
    """Until Prometheus has scraped the count of all `requests`, then one more scrape.

    The extremes gauges are collected before the histograms in one scrape, so the last
    observations may reach the gauges one scrape after the count that shows them.
    """
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        result = prometheus.instant("sum(cliplens_request_seconds_count)", time.time())
        if result and float(result[0]["value"][1]) == requests:
            time.sleep(2 * SCRAPE_S + 0.2)
            return
        time.sleep(0.2)
    raise AssertionError(f"Prometheus did not scrape {requests} requests in 30 s")


async def drive(url: str, prometheus: PrometheusServer) -> list[Level]:
    """Every level against `url`, each ended once `prometheus` has scraped all of its requests."""
    levels: list[Level] = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for concurrency in LEVELS:
            level = Level(concurrency, started=time.time())
            await asyncio.gather(*(_worker(client, level, i) for i in range(concurrency)))
            levels.append(level)
            await asyncio.to_thread(_wait_for_scrape, prometheus, sum(len(lv.sent) for lv in levels))
            level.ended = time.time()
            if concurrency != LEVELS[-1]:
                await asyncio.sleep(PAUSE_S)
    return levels
