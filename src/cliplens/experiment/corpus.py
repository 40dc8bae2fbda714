"""A corpus of phone-like photos, generated here so that nothing has to be downloaded.

Each photo is a landscape rendered from seeded noise (sky gradient, sun, layered ridges, texture
and sensor grain), encoded as a JPEG at phone sizes: 12 MP (4032x3024) and 2-3 MP (1920x1080,
2048x1536), with an EXIF block like a camera's (make, model, orientation). The content has the
spectrum of a natural image (smooth regions, edges, fine grain), which is what decode and resize
cost depends on; the pixels mean nothing to CLIP, and need not.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

SIZES: dict[str, tuple[int, int]] = {
    "12mp": (4032, 3024),
    "3mp": (2048, 1536),
    "2mp": (1920, 1080),
}
DEFAULT_MIX: dict[str, float] = {"12mp": 0.5, "3mp": 0.25, "2mp": 0.25}
"""Half 12 MP camera shots, half 2-3 MP (downscaled shares, screenshots, older phones)."""

_EXIF_ORIENTATION = 0x0112
_EXIF_MAKE = 0x010F
_EXIF_MODEL = 0x0110


@dataclass(frozen=True)
class Photo:
    name: str
    size_class: str
    width: int
    height: int
    bytes: int


def _smooth_noise(rng: np.random.Generator, width: int, height: int, octaves: int = 5) -> np.ndarray:
    """Fractal value noise in [0, 1], built from upscaled random grids."""
    total = np.zeros((height, width), dtype=np.float32)
    weight = 0.0
    for octave in range(octaves):
        cells = 2 ** (octave + 2)
        grid = rng.random((cells, cells), dtype=np.float32)
        layer = Image.fromarray(grid, mode="F").resize((width, height), Image.Resampling.BICUBIC)
        amplitude = 0.5**octave
        total += amplitude * np.asarray(layer)
        weight += amplitude
    total /= weight
    return np.clip(total, 0.0, 1.0)


def render_photo(seed: int, width: int, height: int) -> Image.Image:
    """A natural-looking landscape of the given size, the same for the same seed."""
    rng = np.random.default_rng(seed)
    base_w, base_h = max(width // 4, 64), max(height // 4, 48)
    y = np.linspace(0.0, 1.0, base_h, dtype=np.float32)[:, None]
    x = np.linspace(0.0, 1.0, base_w, dtype=np.float32)[None, :]
    top, horizon = rng.uniform(0.2, 0.6, 3), rng.uniform(0.6, 1.0, 3)
    sky = (1 - y)[..., None] * top + y[..., None] * horizon
    image = np.broadcast_to(sky, (base_h, base_w, 3)).copy()
    sun_x, sun_y = rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.35)
    glow = np.exp(-(((x - sun_x) ** 2) + ((y - sun_y) * 1.3) ** 2) / 0.004)
    image += glow[..., None] * np.array([1.0, 0.9, 0.6], dtype=np.float32)
    clouds = _smooth_noise(rng, base_w, base_h)
    image += (clouds[..., None] - 0.5) * 0.25 * (1 - y)[..., None]
    for layer in range(rng.integers(2, 5)):
        ridge = _smooth_noise(rng, base_w, 1, octaves=6)[0]
        level = 0.45 + 0.12 * layer + 0.2 * (ridge - 0.5)
        mask = (y > level[None, :]).astype(np.float32)
        colour = rng.uniform(0.05, 0.5, 3) * (1.0 - 0.15 * layer)
        texture = _smooth_noise(rng, base_w, base_h, octaves=6)[..., None]
        ground = colour * (0.7 + 0.6 * texture)
        image = image * (1 - mask[..., None]) + ground * mask[..., None]
    small = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8))
    full = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.normal(0.0, 4.0, size=(height, width, 1)).astype(np.int16)
    return Image.fromarray(np.clip(full + grain, 0, 255).astype(np.uint8))


def encode_jpeg(image: Image.Image, quality: int = 90, orientation: int = 1) -> bytes:
    """JPEG bytes with a camera-like EXIF block (orientation as given)."""
    exif = Image.Exif()
    exif[_EXIF_MAKE] = "cliplens"
    exif[_EXIF_MODEL] = "synthetic phone"
    exif[_EXIF_ORIENTATION] = orientation
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality, exif=exif.tobytes())
    return buffer.getvalue()


def plan(count: int, mix: dict[str, float] | None = None) -> list[str]:
    """The size class of each of `count` photos, in proportion to `mix`, interleaved."""
    shares = mix or DEFAULT_MIX
    unknown = set(shares) - set(SIZES)
    if unknown:
        raise ValueError(f"unknown size classes {sorted(unknown)}; known: {sorted(SIZES)}")
    total = sum(shares.values())
    classes: list[str] = []
    credit = dict.fromkeys(shares, 0.0)
    for _ in range(count):
        for name, share in shares.items():
            credit[name] += share / total
        chosen = max(credit, key=lambda name: credit[name])
        credit[chosen] -= 1.0
        classes.append(chosen)
    return classes


def generate(
    directory: Path, count: int, mix: dict[str, float] | None = None, seed: int = 0
) -> Iterator[Photo]:
    """Write `count` photos into `directory` (kept if already there), yielding each as it is ready."""
    directory.mkdir(parents=True, exist_ok=True)
    for index, size_class in enumerate(plan(count, mix)):
        width, height = SIZES[size_class]
        path = directory / f"photo-{index:04d}-{size_class}.jpg"
        if not path.exists():
            data = encode_jpeg(render_photo(seed * 100_003 + index, width, height))
            tmp = path.with_suffix(".part")
            tmp.write_bytes(data)
            tmp.replace(path)
        yield Photo(path.name, size_class, width, height, path.stat().st_size)
