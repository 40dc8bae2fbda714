"""Several workers on one host: one `cliplens serve` process with all the cores, or N processes
with a share each behind HAProxy (what `docker compose up --scale api=N` or N pods do).

Both set-ups get the same closed-loop load through the same proxy (deploy/compose/haproxy.cfg),
with the same total of CPU threads; the script prints images/s, request latency and the mean of
each stage from the `Server-Timing` headers. docs/scaling.md quotes its output.

    .venv/bin/python deploy/local/compare_workers.py                      # tiny CLIP, 2 MP photos
    .venv/bin/python deploy/local/compare_workers.py --model ViT-B-32     # real size, random weights

Everything runs on loopback; the load is bounded in time. Needs Debian's haproxy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.conftest import TINY_ARCHITECTURE  # noqa: E402
from tests.harness.replicas import Haproxy, start_replicas  # noqa: E402

from cliplens.experiment.corpus import encode_jpeg, render_photo  # noqa: E402
from cliplens.vocabulary import Stage  # noqa: E402

STAGES = (*(stage.value for stage in Stage), "total")


def photos(folder: Path, count: int, width: int, height: int) -> list[str]:
    names = []
    for seed in range(count):
        name = f"photo-{seed:02d}.jpg"
        (folder / name).write_bytes(encode_jpeg(render_photo(seed, width, height)))
        names.append(name)
    return names


async def closed_loop(
    url: str, names: list[str], concurrency: int, per_request: int, seconds: float
) -> dict[str, Any]:
    """`concurrency` clients, each sending its next request as soon as the last one answered."""
    latencies: list[float] = []
    stages: dict[str, list[float]] = {stage: [] for stage in STAGES}
    images = 0
    deadline = time.monotonic() + seconds

    async def client(index: int, http: httpx.AsyncClient) -> None:
        nonlocal images
        turn = index
        while time.monotonic() < deadline:
            batch = [names[(turn + k) % len(names)] for k in range(per_request)]
            turn += concurrency
            started = time.monotonic()
            response = await http.post("/v1/embeddings", json={"input": batch, "encoding_format": "base64"})
            if response.status_code != 200:
                raise RuntimeError(f"{response.status_code}: {response.text[:200]}")
            latencies.append(time.monotonic() - started)
            images += len(response.json()["data"])
            for name, ms in re.findall(r"(\w+);dur=([0-9.]+)", response.headers["server-timing"]):
                if name in stages:
                    stages[name].append(float(ms))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        began = time.monotonic()
        await asyncio.gather(*(client(i, http) for i in range(concurrency)))
        elapsed = time.monotonic() - began
    ordered = sorted(latencies)
    return {
        "requests": len(latencies),
        "images_per_s": images / elapsed,
        "latency_p50_ms": 1e3 * ordered[len(ordered) // 2],
        "latency_p95_ms": 1e3 * ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "stage_mean_ms": {stage: statistics.fmean(v) for stage, v in stages.items() if v},
    }


def measure(
    processes: int, cores: int, args: argparse.Namespace, model: str, image_root: Path, names: list[str]
) -> dict[str, Any]:
    share = max(1, cores // processes)
    environment = {
        "CLIPLENS_MODEL": model,
        "CLIPLENS_PRETRAINED": "none",
        "CLIPLENS_IMAGE_ROOT": str(image_root),
        "CLIPLENS_CPU_WORKERS": str(share),
        "CLIPLENS_MODEL_THREADS": str(share),
        "CLIPLENS_LOG_LEVEL": "WARNING",
    }
    with tempfile.TemporaryDirectory() as work:
        replicas = start_replicas(processes, environment, Path(work))
        proxy = Haproxy([r.address for r in replicas], Path(work)).start()
        try:
            asyncio.run(closed_loop(proxy.url, names, args.concurrency, args.images, args.warmup))
            result = asyncio.run(closed_loop(proxy.url, names, args.concurrency, args.images, args.seconds))
        finally:
            proxy.stop()
            for replica in replicas:
                replica.stop()
    return {"processes": processes, "threads_each": share, **result}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="tiny", help="`tiny` (the tests' architecture) or an open_clip name"
    )
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts to compare")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--images", type=int, default=4, help="images per request")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--photo-size", default="1600x1200")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    width, height = (int(v) for v in args.photo_size.split("x"))
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        if args.model == "tiny":
            model_dir = folder / "tiny"
            model_dir.mkdir()
            (model_dir / "open_clip_config.json").write_text(
                json.dumps({"model_cfg": TINY_ARCHITECTURE, "preprocess_cfg": {}})
            )
            model = f"local-dir:{model_dir}"
        else:
            model = args.model
        image_root = folder / "photos"
        image_root.mkdir()
        names = photos(image_root, 16, width, height)
        results = [measure(int(n), cores, args, model, image_root, names) for n in args.processes.split(",")]
    lines = [
        f"{cores} cores, model {args.model}, {args.photo_size} photos, {args.images} images/request, "
        f"closed loop x{args.concurrency}, {args.seconds:g} s",
        "processes  threads  requests  images/s  p50 ms  p95 ms  " + "  ".join(f"{s:>10}" for s in STAGES),
    ]
    for r in results:
        means = "  ".join(f"{r['stage_mean_ms'].get(s, float('nan')):10.1f}" for s in STAGES)
        lines.append(
            f"{r['processes']:9d}  {r['threads_each']:7d}  {r['requests']:8d}  {r['images_per_s']:8.1f}  "
            f"{r['latency_p50_ms']:6.0f}  {r['latency_p95_ms']:6.0f}  {means}"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
