"""A faithful re-implementation of the pipeline cliplens replaces, served the same way, for comparison.

What the original server did per request (from the study that started the project):
- a new ThreadPoolExecutor per request (default size: min(32, cores + 4));
- load every photo (here: read from the same local directory cliplens reads), then decode every
  photo at full resolution with `cv2.imdecode` and convert BGR -> RGB;
- preprocess each image with open_clip's own PIL transform, in that per-request pool;
- embed in per-request batches of 32, float32, on the device given (the original ran on a GPU),
  on a thread of its own (requests do not share batches).

It answers POST /v1/embeddings with the same envelope shape as cliplens and a `Server-Timing`
header whose stage windows mean the same as cliplens's (from the first image entering a stage to the
last leaving it). Per-image work times are kept in memory and served at GET /stats, so the
benchmark can show how per-image preprocess work grows under concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import open_clip
import torch
import uvicorn
from litestar import Litestar, Response, get, post
from PIL import Image

BATCH = 32


class OriginalPipeline:
    def __init__(self, model_name: str, pretrained: str | None, image_root: Path, device: str) -> None:
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained
        )
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.image_root = image_root.resolve()
        self.work: dict[str, list[float]] = {"load": [], "decode": [], "preprocess": []}
        self._lock = threading.Lock()

    def _record(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.work[stage].append(seconds)

    def _load(self, name: str) -> bytes:
        started = time.perf_counter()
        data = (self.image_root / name).read_bytes()
        self._record("load", time.perf_counter() - started)
        return data

    def _decode(self, data: bytes) -> np.ndarray:
        started = time.perf_counter()
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if decoded is None:
            raise ValueError("OpenCV cannot decode the image")
        image = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
        self._record("decode", time.perf_counter() - started)
        return image

    def _preprocess(self, pixels: np.ndarray) -> torch.Tensor:
        started = time.perf_counter()
        tensor: torch.Tensor = self.preprocess(Image.fromarray(pixels))
        self._record("preprocess", time.perf_counter() - started)
        return tensor

    def _embed(self, tensors: list[torch.Tensor]) -> np.ndarray:
        outputs = []
        with torch.no_grad():
            for start in range(0, len(tensors), BATCH):
                batch = torch.stack(tensors[start : start + BATCH]).to(self.device)
                features = self.model.encode_image(batch)
                outputs.append(torch.nn.functional.normalize(features, dim=-1).cpu().numpy())
        return np.concatenate(outputs)

    async def embed(self, names: list[str]) -> tuple[np.ndarray, dict[str, float]]:
        loop = asyncio.get_running_loop()
        timings: dict[str, float] = {}
        started = time.perf_counter()
        with ThreadPoolExecutor() as pool:
            data = await asyncio.gather(*(loop.run_in_executor(pool, self._load, n) for n in names))
            timings["load"] = time.perf_counter() - started
            mark = time.perf_counter()
            pixels = await asyncio.gather(*(loop.run_in_executor(pool, self._decode, d) for d in data))
            timings["decode"] = time.perf_counter() - mark
            mark = time.perf_counter()
            tensors = await asyncio.gather(*(loop.run_in_executor(pool, self._preprocess, p) for p in pixels))
            timings["preprocess"] = time.perf_counter() - mark
        mark = time.perf_counter()
        vectors = await asyncio.to_thread(self._embed, list(tensors))
        timings["embed"] = time.perf_counter() - mark
        timings["total"] = time.perf_counter() - started
        return vectors, timings


def create_original_app(pipeline: OriginalPipeline) -> Litestar:
    @post("/v1/embeddings", status_code=200)
    async def embeddings(data: dict[str, Any]) -> Response[dict[str, Any]]:
        names = data["input"] if isinstance(data["input"], list) else [data["input"]]
        vectors, timings = await pipeline.embed(names)
        header = ", ".join(f"{stage};dur={seconds * 1000:.1f}" for stage, seconds in timings.items())
        items = [{"object": "embedding", "index": i, "embedding": v.tolist()} for i, v in enumerate(vectors)]
        body = {"object": "list", "data": items, "errors": []}
        return Response(body, headers={"Server-Timing": header})

    @get("/stats", sync_to_thread=False)
    def stats(reset: bool = False) -> dict[str, list[float]]:
        with pipeline._lock:
            snapshot = {stage: list(values) for stage, values in pipeline.work.items()}
            if reset:
                for values in pipeline.work.values():
                    values.clear()
        return snapshot

    @get("/readyz", sync_to_thread=False)
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    return Litestar([embeddings, stats, readyz], logging_config=None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--image-root", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--device", default="cpu", help="the original was a GPU server: cuda there")
    args = parser.parse_args()
    pipeline = OriginalPipeline(args.model, args.pretrained, args.image_root, args.device)
    uvicorn.run(create_original_app(pipeline), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
