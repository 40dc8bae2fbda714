"""Decoding: encoded bytes in, the RGB pixels a user would see out (the `decode` stage).

Only the pixels the model needs are decoded: a JPEG is decoded in the DCT domain at the smallest
scale (1/2, 1/4, 1/8) whose shorter side still covers `min_side`, which for a 12 MP phone photo is
16-64x less work than a full decode, and the final antialiased resize happens in `preprocess`.
With `CLIPLENS_GPU_DECODE`, JPEGs are instead decoded by torchvision on the model's device
(nvJPEG on CUDA) into a tensor that never leaves it; other formats, and JPEGs that path cannot
take (CMYK), still go through Pillow.
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
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

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
    """RGB uint8 pixels, (height, width, 3) numpy from Pillow or (3, height, width) torch from the
    device decoder, and where they came from."""

    pixels: np.ndarray | torch.Tensor
    format: str
    original_size: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        if isinstance(self.pixels, torch.Tensor):
            return (int(self.pixels.shape[2]), int(self.pixels.shape[1]))
        return (int(self.pixels.shape[1]), int(self.pixels.shape[0]))


def _open_checked(data: bytes, max_pixels: int) -> tuple[Image.Image, str]:
    """Open the header only, after the signature check, and enforce the pixel cap."""
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
    width, height = image.size
    if width <= 0 or height <= 0:
        image.close()
        raise ItemError(ErrorCode.DECODE_FAILED, "the image has no pixels")
    if width * height > max_pixels:
        image.close()
        raise ItemError(ErrorCode.TOO_LARGE, f"{width}x{height} is more than the {max_pixels} pixels allowed")
    return image, image_format


def decode_on_device(data: bytes, device: torch.device, min_side: int, max_pixels: int) -> DecodedImage:
    """Decode a JPEG with torchvision on `device` (nvJPEG on CUDA); anything else via Pillow.

    The header checks (signature, pixel cap) are the same as `decode_image`'s, done before any
    pixel is decoded. EXIF orientation is applied by the decoder.
    """
    image, image_format = _open_checked(data, max_pixels)
    with image:
        size, mode = image.size, image.mode
    if image_format != "JPEG" or mode not in ("RGB", "L"):
        return decode_image(data, min_side, max_pixels)
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            pixels = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)
    except RuntimeError:
        return decode_image(data, min_side, max_pixels)
    return DecodedImage(pixels, image_format, size)


def decode_image(data: bytes, min_side: int, max_pixels: int) -> DecodedImage:
    """Decode `data` to RGB pixels whose shorter side is at least `min_side` when the source allows.

    Raises ItemError: `unsupported_format`, `too_large` or `decode_failed`.
    """
    image, image_format = _open_checked(data, max_pixels)
    with image:
        width, height = image.size
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
