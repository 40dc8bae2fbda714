"""A corpus of phone-like photos, generated here so that nothing has to be downloaded.

Each photo is a landscape rendered from seeded noise (sky gradient, sun, layered ridges, texture
and sensor grain), encoded as a JPEG at phone sizes: 12 MP (4032x3024) and 2-3 MP (1920x1080,
2048x1536), with an EXIF block like a camera's (make, model, orientation). The content has the
spectrum of a natural image (smooth regions, edges, fine grain), which is what decode and resize
cost depends on; the pixels mean nothing to CLIP, and need not.

The mix of sizes is a parameter (`12mp=0.5,3mp=0.25,2mp=0.25`; any `WIDTHxHEIGHT` is a size class
too, which is how the tests make a corpus of small photos), and a user's own folder of photos can
stand in for the generated corpus (`collect`), or a seeded `sample` of it. Either way `describe`
says what was measured.
"""

from __future__ import annotations

import io
import multiprocessing
import random
import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif")
"""Files `collect` takes from a user's folder (the formats the service decodes)."""

UNKNOWN_SIZE = "unknown"
"""The size class of a photo whose pixels were not read (an object listed in a bucket)."""

_PARALLEL_PIXELS = 30_000_000
"""Below this many pixels to render, starting worker processes costs more than it saves."""
_DIMENSIONS = re.compile(r"^(\d+)x(\d+)$")


@dataclass(frozen=True)
class Photo:
    """One photo of the corpus; `name` is its path relative to the corpus directory (POSIX), or its
    object name in a bucket. Width and height are 0 when unknown (size class `UNKNOWN_SIZE`)."""

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


def distinct_copy(jpeg: bytes, number: int) -> bytes:
    """The same JPEG, pixel for pixel, with a comment segment holding `number`: other bytes, so
    another photo to the embedding cache (whose keys name exact bytes), at the same cost to embed."""
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    comment = b"cliplens copy " + str(number).encode()
    return jpeg[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + jpeg[2:]


def dimensions(size_class: str) -> tuple[int, int]:
    """Width and height of a size class: a named phone size (`12mp`) or `WIDTHxHEIGHT`."""
    if size_class in SIZES:
        return SIZES[size_class]
    match = _DIMENSIONS.match(size_class)
    if match is None or int(match.group(1)) < 16 or int(match.group(2)) < 16:
        raise ValueError(
            f"unknown size class {size_class!r}; use one of {', '.join(SIZES)} or WIDTHxHEIGHT (>= 16x16)"
        )
    return int(match.group(1)), int(match.group(2))


def parse_mix(text: str) -> dict[str, float]:
    """`12mp=0.5,3mp=0.25,2mp=0.25` (shares need not add up to 1) -> {"12mp": 0.5, ...}."""
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, sep, share = part.strip().partition("=")
        if not part.strip():
            continue
        try:
            value = float(share) if sep else 1.0
        except ValueError:
            raise ValueError(f"{part.strip()!r}: the share must be a number, as in 12mp=0.5") from None
        if value < 0:
            raise ValueError(f"{part.strip()!r}: a share cannot be negative")
        dimensions(name.strip())
        mix[name.strip()] = value
    if not mix or sum(mix.values()) <= 0:
        raise ValueError(f"{text!r} is not a mix; write e.g. 12mp=0.5,3mp=0.25,2mp=0.25")
    return mix


def plan(count: int, mix: dict[str, float] | None = None) -> list[str]:
    """The size class of each of `count` photos, in proportion to `mix`, interleaved."""
    shares = {name: share for name, share in (mix or DEFAULT_MIX).items() if share > 0}
    for name in shares:
        dimensions(name)
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


def _write_photo(path: Path, size_class: str, seed: int) -> Photo:
    """Render and write one photo (atomically: a crash never leaves half a JPEG under its name)."""
    width, height = dimensions(size_class)
    if not path.exists():
        data = encode_jpeg(render_photo(seed, width, height))
        tmp = path.with_suffix(".part")
        tmp.write_bytes(data)
        tmp.replace(path)
    return Photo(path.name, size_class, width, height, path.stat().st_size)


def generate(
    directory: Path,
    count: int,
    mix: dict[str, float] | None = None,
    seed: int = 0,
    workers: int = 1,
) -> Iterator[Photo]:
    """Write `count` photos into `directory` (kept if already there), yielding each as it is ready.

    A 12 MP photo takes about a second of one core to render, and threads do not help (the work
    holds the GIL), so `workers` > 1 renders in that many spawned processes. Photos are yielded
    in completion order; the same arguments always give the same files.
    """
    directory.mkdir(parents=True, exist_ok=True)
    jobs = [
        (directory / f"photo-{index:04d}-{size_class}.jpg", size_class, seed * 100_003 + index)
        for index, size_class in enumerate(plan(count, mix))
    ]
    missing = [job for job in jobs if not job[0].exists()]
    pixels = sum(dimensions(size_class)[0] * dimensions(size_class)[1] for _, size_class, _ in missing)
    if workers <= 1 or len(missing) <= 1 or pixels < _PARALLEL_PIXELS:
        for job in jobs:
            yield _write_photo(*job)
        return
    for job in jobs:
        if job[0].exists():
            yield _write_photo(*job)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(missing)), mp_context=context) as pool:
        futures = [pool.submit(_write_photo, *job) for job in missing]
        for future in as_completed(futures):
            yield future.result()


def collect(directory: Path) -> list[Photo]:
    """The photos of a user's folder (recursively), sized from their headers, sorted by name.

    The size class of a user's photo is its megapixel count rounded (`12mp`, `<1mp`), so that `describe`
    gives the same kind of mix for a folder as for a generated corpus.
    """
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    photos: list[Photo] = []
    for path in sorted(directory.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in PHOTO_SUFFIXES:
            continue
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, ValueError):
            continue
        megapixels = round(width * height / 1e6)
        size_class = f"{megapixels}mp" if megapixels else "<1mp"
        name = path.relative_to(directory).as_posix()
        photos.append(Photo(name, size_class, width, height, path.stat().st_size))
    if not photos:
        raise ValueError(f"{directory} holds no photos ({', '.join(PHOTO_SUFFIXES)})")
    return photos


def sample(photos: list[Photo], limit: int | None, seed: int) -> list[Photo]:
    """`limit` of the photos, drawn with `seed` (the same seed, the same photos), in name order;
    all of them when `limit` is None or not below their number."""
    if limit is None or limit >= len(photos):
        return photos
    return sorted(random.Random(seed).sample(photos, limit), key=lambda photo: photo.name)


def describe(
    photos: list[Photo], source: str, directory: Path | str, mix: dict[str, float] | None = None
) -> dict[str, Any]:
    """What the corpus is, for results.json: a later reader must know what the timings were of.
    `mean_megapixels` is over the photos whose size is known, None when none is."""
    classes = Counter(photo.size_class for photo in photos)
    total = sum(photo.bytes for photo in photos)
    sized = [photo for photo in photos if photo.width and photo.height]
    return {
        "source": source,
        "directory": str(directory),
        "count": len(photos),
        "bytes": total,
        "mean_bytes": total / len(photos) if photos else 0,
        "mean_megapixels": sum(p.width * p.height for p in sized) / len(sized) / 1e6 if sized else None,
        "mix": mix if mix is not None else None,
        "classes": dict(sorted(classes.items())),
    }
