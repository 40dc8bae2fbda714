"""The bounds hold against a real `cliplens serve` process: texts cannot starve images, no request
passes the admission bound, and memory stays inside the budget however the request is built."""

from __future__ import annotations

import asyncio
import base64
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from cliplens.experiment.corpus import encode_jpeg, render_photo
from tests.harness.service import log_problems, serving

MIB = 2**20
IMAGES = ["album/1/a.jpg", "album/1/b.jpg", "album/2/c.jpg"]


def data_uri(data: bytes, kind: str) -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def test_long_texts_neither_freeze_images_nor_pass_the_text_cap(
    tiny_model: str, photo_dir: Path, tmp_path: Path
) -> None:
    """Two 30,000-letter texts once held the CPU pool for 86 s; now the first is refused before
    the tokenizer sees it, the second is cut to the cap, and the images sent meanwhile all embed."""
    long_text = "a" * 30_000
    with (
        serving(
            tiny_model,
            tmp_path,
            CLIPLENS_IMAGE_ROOT=str(photo_dir),
            CLIPLENS_REQUEST_TIMEOUT_S="30",
            CLIPLENS_MAX_TEXT_CHARS="2000",
        ) as service,
        ThreadPoolExecutor(8) as pool,
    ):
        url = f"{service.url}/v1/embeddings"
        texts = [
            pool.submit(httpx.post, url, json={"input": [long_text], "modality": "text"}, timeout=60),
            pool.submit(
                httpx.post,
                url,
                json={"input": [long_text, "a photo of a cat"], "modality": "text", "truncate": True},
                timeout=60,
            ),
        ]
        images = [pool.submit(httpx.post, url, json={"input": IMAGES}, timeout=60) for _ in range(6)]
        refused, truncated = (future.result() for future in texts)
        for response in (future.result() for future in images):
            assert response.status_code == 200
            assert response.json()["errors"] == [], response.json()["errors"]
            assert len(response.json()["data"]) == len(IMAGES)
        assert refused.status_code == 200
        error = refused.json()["errors"][0]
        assert error["code"] == "text_too_long" and "30000 characters" in error["message"]
        assert refused.json()["data"] == []
        assert truncated.status_code == 200
        assert [d["index"] for d in truncated.json()["data"]] == [0, 1]
        assert truncated.json()["truncated"] == [0]
        assert truncated.json()["usage"]["prompt_tokens"] > 0
        assert service.metric("cliplens_images_total", outcome="timeout") == 0
        assert not log_problems(service)


def test_no_request_passes_the_admission_bound_alone(
    tiny_model: str, photo_dir: Path, tmp_path: Path
) -> None:
    """One idle-time request of 17 items under a bound of 16 used to be admitted whole."""
    with serving(
        tiny_model,
        tmp_path,
        CLIPLENS_IMAGE_ROOT=str(photo_dir),
        CLIPLENS_MAX_IMAGES_IN_FLIGHT="16",
        CLIPLENS_MAX_INPUTS="64",
    ) as service:
        url = f"{service.url}/v1/embeddings"
        for body in ({"input": IMAGES * 6}, {"input": ["a cat"] * 17, "modality": "text"}):
            too_big = httpx.post(url, json=body, timeout=30)
            assert too_big.status_code == 413
            assert too_big.json()["error"]["code"] == "too_many_items"
            assert "CLIPLENS_MAX_IMAGES_IN_FLIGHT" in too_big.json()["error"]["message"]
        fits = httpx.post(url, json={"input": (IMAGES * 6)[:16]}, timeout=30)
        assert fits.status_code == 200 and len(fits.json()["data"]) == 16
        assert service.metric("cliplens_images_in_flight_max") <= 16
        assert service.metric("cliplens_images_in_flight") == 0


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    """A real 100-megapixel RGBA PNG (legal under the default pixel cap) that compresses to ~400 KB
    and decodes to gigabytes."""
    image = Image.new("RGBA", (10_000, 10_000), (40, 90, 200, 128))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def test_huge_pngs_are_too_large_without_being_decoded(
    tiny_model: str, tmp_path: Path, huge_png: bytes
) -> None:
    with serving(tiny_model, tmp_path, CLIPLENS_MEMORY_BUDGET_BYTES=str(1024 * MIB)) as service:
        before = service.reset_peak()
        body = {"input": [data_uri(huge_png, "png")] * 6}
        response = httpx.post(f"{service.url}/v1/embeddings", json=body, timeout=120)
        grown_mib = (service.rss_kib("VmHWM") - before) / 1024
        assert response.status_code == 200
        codes = {error["code"] for error in response.json()["errors"]}
        assert codes == {"too_large"}, response.json()["errors"][0]
        assert "CLIPLENS_MEMORY_BUDGET_BYTES" in response.json()["errors"][0]["message"]
        print(f"six 100 MP PNGs: peak RSS grew {grown_mib:.0f} MiB")
        assert grown_mib < 256, f"peak RSS grew {grown_mib:.0f} MiB"


def gradient_png(width: int, height: int, seed: int) -> bytes:
    image = render_photo(seed, width // 8, height // 8).resize((width, height), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def test_decodes_wait_for_the_budget_instead_of_passing_it(tiny_model: str, tmp_path: Path) -> None:
    """Four 12 MP PNGs (~190 MiB each to decode, predicted) under a 256 MiB budget decode one at a
    time: all embed, and the peak stays under the budget where two CPU workers at once would pass it."""
    budget_mib = 256
    pngs = [gradient_png(4000, 3000, seed) for seed in range(4)]
    with serving(tiny_model, tmp_path, CLIPLENS_MEMORY_BUDGET_BYTES=str(budget_mib * MIB)) as service:
        before = service.reset_peak()
        body = {"input": [data_uri(png, "png") for png in pngs]}
        response = httpx.post(f"{service.url}/v1/embeddings", json=body, timeout=120)
        grown_mib = (service.rss_kib("VmHWM") - before) / 1024
        assert response.status_code == 200
        assert response.json()["errors"] == [] and len(response.json()["data"]) == 4
        print(f"four 12 MP PNGs under {budget_mib} MiB: peak RSS grew {grown_mib:.0f} MiB")
        assert grown_mib < budget_mib, f"peak RSS grew {grown_mib:.0f} MiB"
        assert service.metric("cliplens_memory_reserved_bytes") == 0


async def _load(url: str, references: list[str], concurrency: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=300) as client:
        return await asyncio.gather(
            *(client.post(url, json={"input": references}) for _ in range(concurrency))
        )


@pytest.mark.slow
def test_thirty_requests_of_fifty_12mp_photos_stay_inside_the_budget(tiny_model: str, tmp_path: Path) -> None:
    """The study's load (50 x 30) on 12 MP photos held ~1,400 images and +5.3 GB at once; now the
    peak stays within the budget plus the downloads the gate lets start before it closes."""
    budget_mib = 256
    root = tmp_path / "photos"
    root.mkdir()
    names = []
    for seed in range(5):
        (root / f"p{seed}.jpg").write_bytes(encode_jpeg(render_photo(seed, 4000, 3000)))
        names.append(f"p{seed}.jpg")
    references = [names[i % len(names)] for i in range(50)]
    with serving(
        tiny_model,
        tmp_path,
        CLIPLENS_IMAGE_ROOT=str(root),
        CLIPLENS_MEMORY_BUDGET_BYTES=str(budget_mib * MIB),
        CLIPLENS_REQUEST_TIMEOUT_S="300",
    ) as service:
        before = service.reset_peak()
        responses = asyncio.run(_load(f"{service.url}/v1/embeddings", references, 30))
        grown_mib = (service.rss_kib("VmHWM") - before) / 1024
        assert [r.status_code for r in responses] == [200] * 30
        assert all(r.json()["errors"] == [] for r in responses)
        print(f"50 x 30 12 MP photos under {budget_mib} MiB: peak RSS grew {grown_mib:.0f} MiB")
        assert grown_mib < 2 * budget_mib, f"peak RSS grew {grown_mib:.0f} MiB"
        assert service.metric("cliplens_memory_reserved_bytes") == 0
