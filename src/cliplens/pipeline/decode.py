"""Decoding: encoded bytes in, the RGB pixels a user would see out (the `decode` stage).

Only the pixels the model needs are decoded: a JPEG is decoded in the DCT domain at the smallest
scale (1/2, 1/4, 1/8) whose shorter side still covers `min_side`, which for a 12 MP phone photo is
16-64x less work than a full decode, and the final antialiased resize happens in `preprocess`.
The format is decided from the bytes' signature, never the file name, and the pixel count is
checked from the header before any pixel buffer is allocated. EXIF orientation is applied, and
CMYK, grayscale, 16-bit, palette and alpha images are each turned into 8-bit RGB explicitly.
"""

from __future__ import annotations

import io
import math
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cliplens.pipeline.errors import ErrorCode, ItemError

BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited over white, as image viewers show them."""

_SIGNATURES: tuple[tuple[bytes, int, str], ...] = (
    (b"\xff\xd8\xff", 0, "JPEG"),
    (b"\x89PNG\r\n\x1a\n", 0, "PNG"),
    (b"GIF87a", 0, "GIF"),
    (b"GIF89a", 0, "GIF"),
    (b"BM", 0, "BMP"),
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
)
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def sniff_format(data: bytes) -> str | None:
    """The image format named by the leading bytes, or None when it is not one we accept."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, offset, name in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic:
            return name
    return None


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """RGB uint8 pixels (height, width, 3) and where they came from."""

    pixels: np.ndarray
    format: str
    original_size: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        return (int(self.pixels.shape[1]), int(self.pixels.shape[0]))


def decode_image(data: bytes, min_side: int, max_pixels: int) -> DecodedImage:
    """Decode `data` to RGB pixels whose shorter side is at least `min_side` when the source allows.

    Raises ItemError: `unsupported_format`, `too_large` or `decode_failed`.
    """
    if not data:
        raise ItemError(ErrorCode.DECODE_FAILED, "the image is empty (0 bytes)")
    image_format = sniff_format(data)
    if image_format is None:
        raise ItemError(
            ErrorCode.UNSUPPORTED_FORMAT,
            f"the bytes are not an image in an accepted format ({', '.join(ALLOWED_FORMATS)})",
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=[image_format])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ItemError(ErrorCode.TOO_LARGE, f"the image declares too many pixels: {exc}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ItemError(ErrorCode.DECODE_FAILED, f"the {image_format} header is unreadable: {exc}") from None
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ItemError(ErrorCode.DECODE_FAILED, "the image has no pixels")
        if width * height > max_pixels:
            raise ItemError(
                ErrorCode.TOO_LARGE, f"{width}x{height} is more than the {max_pixels} pixels allowed"
            )
        if image_format == "JPEG" and min(width, height) > min_side:
            scale = min_side / min(width, height)
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        try:
            image.load()
            pixels = _to_rgb(ImageOps.exif_transpose(image))
        except ItemError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
            raise ItemError(ErrorCode.DECODE_FAILED, f"the {image_format} data is corrupt: {exc}") from None
    return DecodedImage(pixels, image_format, (width, height))


def _to_rgb(image: Image.Image) -> np.ndarray:
    """8-bit RGB pixels from any mode Pillow decodes, each handled on purpose."""
    mode = image.mode
    if mode == "RGB":
        return np.array(image)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        wide = np.asarray(image).astype(np.uint32)
        peak = 65535 if mode != "I" or wide.max(initial=0) > 255 else 255
        gray = (wide * 255 + peak // 2) // peak
        return np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)
    if mode == "F":
        gray = np.clip(np.asarray(image), 0.0, 1.0) * 255.0 + 0.5
        return np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return np.array(Image.alpha_composite(background, rgba).convert("RGB"))
    if mode == "L" and "transparency" in image.info:
        return _to_rgb(image.convert("LA"))
    return np.array(image.convert("RGB"))
