"""The experiment's scenarios for locust users: N images per request, C users sending at once.

`cliplens experiment` is the reference measurement (it keeps every raw number and draws the
figure); this file is for teams that already drive their load tests with locust. Each locust user
is one concurrent client that sends POST /v1/embeddings with `--images` photo references, one
request after the other. Besides the HTTP request itself, each response's `Server-Timing` entries
(per-request stage windows) are reported to locust as requests of type `stage`, and each image's
wait + work per stage (from `"timings": true`) as type `image`, so locust's own statistics table
shows min / max / mean / percentiles per stage in both scopes, like the experiment's.

    # the study's 50 images x 30 concurrent, against a service reading ./cliplens-results/photos
    locust -f locustfile.py --headless --host http://127.0.0.1:8000 \\
        --users 30 --spawn-rate 30 --run-time 2m --images 50 --photo-dir cliplens-results/photos

Photos: `--photo-dir DIR` sends the names of the photos under DIR (the service must have
CLIPLENS_IMAGE_ROOT=DIR), or `--references FILE` sends the lines of FILE as they are (object names
or gs:// URIs; `cliplens experiment` writes the ones it used to DIR/references.txt). `--token`
adds a bearer token. The file needs only locust; it does not import cliplens.
"""

from __future__ import annotations

import itertools
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from locust import HttpUser, events, task

_TIMING_ENTRY = re.compile(r"^\s*([A-Za-z0-9_+-]+)\s*;.*?dur=([0-9.]+)")
_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")
_cycle: Iterator[str] | None = None
_cycle_lock = threading.Lock()


@events.init_command_line_parser.add_listener
def _options(parser: Any) -> None:
    parser.add_argument("--images", type=int, default=50, help="photo references per request")
    parser.add_argument("--photo-dir", default="", help="send the names of the photos under this folder")
    parser.add_argument("--references", default="", help="send the lines of this file as references")
    parser.add_argument("--token", default="", help="bearer token (CLIPLENS_API_TOKENS)")


def _references(options: Any) -> list[str]:
    if options.references:
        lines = Path(options.references).read_text().splitlines()
        return [line.strip() for line in lines if line.strip()]
    if options.photo_dir:
        root = Path(options.photo_dir)
        return sorted(
            p.relative_to(root).as_posix()
            for p in root.rglob("*")
            if p.is_file() and p.suffix.lower() in _SUFFIXES
        )
    raise SystemExit("locustfile: give --photo-dir DIR or --references FILE")


@events.init.add_listener
def _prepare(environment: Any, **kwargs: Any) -> None:
    global _cycle
    if environment.parsed_options is not None:
        references = _references(environment.parsed_options)
        if not references:
            raise SystemExit("locustfile: no photo references found")
        _cycle = itertools.cycle(references)


def _next_batch(count: int) -> list[str]:
    """Successive users take successive photos, like the experiment's concurrent requests."""
    assert _cycle is not None
    with _cycle_lock:
        return [next(_cycle) for _ in range(count)]


def _report(environment: Any, request_type: str, name: str, milliseconds: float) -> None:
    environment.events.request.fire(
        request_type=request_type,
        name=name,
        response_time=milliseconds,
        response_length=0,
        exception=None,
        context={},
    )


class EmbeddingClient(HttpUser):
    """One concurrent client: requests of `--images` photos, back to back."""

    @task
    def embed(self) -> None:
        options = self.environment.parsed_options
        headers = {"Authorization": f"Bearer {options.token}"} if options.token else {}
        payload = {
            "input": _next_batch(options.images),
            "modality": "image",
            "encoding_format": "base64",
            "timings": True,
            "on_error": "partial",  # a failed photo is reported as a failure, its stage times kept
        }
        name = f"embeddings x{options.images}"
        with self.client.post(
            "/v1/embeddings", json=payload, headers=headers, name=name, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}")
                return
            body = response.json()
            if body["errors"]:
                response.failure(f"{len(body['errors'])} items failed: {body['errors'][0]['code']}")
            for entry in (response.headers.get("server-timing") or "").split(","):
                match = _TIMING_ENTRY.match(entry)
                if match:
                    _report(self.environment, "stage", match.group(1), float(match.group(2)))
            for item in body.get("timings") or []:
                for stage, timing in item["stages"].items():
                    _report(self.environment, "image", stage, timing["queue_ms"] + timing["work_ms"])
