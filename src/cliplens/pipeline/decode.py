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
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_jpeg

from cliplens.vocabulary import ErrorCode, ItemError

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


def _open_header(data: bytes, image_format: str) -> Image.Image:
    """Pillow's reader for `image_format`, on the header only (no pixel is decoded yet).

    The format's plugin is called directly instead of through `Image.open`, whose own bomb check
    (Pillow's process-wide `MAX_IMAGE_PIXELS`, 89 MP) would override the `max_pixels` setting, and
    could only be made an error by changing the process-wide warning filters from many decode
    threads at once (`warnings.catch_warnings` is not thread-safe). The cap is checked right after.
    """
    Image.init()
    factory, _ = Image.OPEN[image_format]
    return factory(io.BytesIO(data), "")


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
        image = _open_header(data, image_format)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, KeyError, struct.error) as exc:
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
    pixel is decoded. Two things the device decoder does not do are done here: EXIF orientation
    (torchvision ignores `apply_exif_orientation` on CUDA) is read from the header and applied to
    the tensor, and a file that does not end with its EOI marker goes to Pillow, because nvJPEG
    decodes even 5% of a JPEG without an error (the rest comes out grey) where Pillow refuses it.
    """
    image, image_format = _open_checked(data, max_pixels)
    with image:
        size, mode = image.size, image.mode
        try:
            orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
        except (SyntaxError, ValueError, TypeError, OSError, struct.error):
            orientation = 0
    complete = data.rstrip(b"\0")[-2:] == b"\xff\xd9"
    if image_format != "JPEG" or mode not in ("RGB", "L") or not complete or orientation not in _ORIENT:
        return decode_image(data, min_side, max_pixels)
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        pixels = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=False)
    except RuntimeError:
        return decode_image(data, min_side, max_pixels)
    return DecodedImage(_ORIENT[orientation](pixels).contiguous(), image_format, size)


_EXIF_ORIENTATION = 0x0112
_ORIENT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    1: lambda t: t,
    2: lambda t: t.flip(-1),
    3: lambda t: t.flip(-2, -1),
    4: lambda t: t.flip(-2),
    5: lambda t: t.transpose(-2, -1),
    6: lambda t: torch.rot90(t, -1, dims=(-2, -1)),
    7: lambda t: t.transpose(-2, -1).flip(-2, -1),
    8: lambda t: torch.rot90(t, 1, dims=(-2, -1)),
}
"""EXIF orientation -> the transform that shows a (channels, height, width) image upright, as
Pillow's `ImageOps.exif_transpose` does; any other value sends the image to the Pillow path."""


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
