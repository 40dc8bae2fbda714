"""Files that lie about themselves, built in the tests (no large binaries in the repository).

`HOSTILE_FILES` names each hostile file and the item error code the service must give it, when
its per-image byte cap is `MAX_IMAGE_BYTES`: the hostile-input tests send them through the HTTP
API, the storage-fault tests serve some of them from a misbehaving GCS.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

from cliplens.experiment.corpus import encode_jpeg, render_photo

MAX_IMAGE_BYTES = 1024 * 1024
"""The per-image byte cap the hostile files are built against (`over-byte-cap.jpg` exceeds it)."""


def png_claiming(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring `width` x `height`, with a few bytes of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is rewritten to declare `width` x `height`."""
    data = bytearray(encode_jpeg(render_photo(1, 64, 48)))
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


PHOTO = render_photo(31, 640, 480)
"""The photo the truncated, corrupted and re-encoded hostile files are made of."""
JPEG = encode_jpeg(PHOTO)


def gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(save(Image.new("P", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(save(Image.new("RGB", (8, 8)), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def tiff_claiming(width: int, height: int) -> bytes:
    data = bytearray(save(Image.new("RGB", (8, 8)), "TIFF"))
    ifd = struct.unpack("<I", data[4:8])[0]
    for entry in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        at = ifd + 2 + 12 * entry
        (tag,) = struct.unpack("<H", data[at : at + 2])
        if tag in (256, 257):  # ImageWidth, ImageLength
            value = width if tag == 256 else height
            data[at + 2 : at + 12] = struct.pack("<HII", 4, 1, value)
    return bytes(data)


def zeroed(data: bytes, start: int, end: int) -> bytes:
    return data[:start] + b"\0" * (end - start) + data[end:]


HOSTILE_FILES: dict[str, tuple[bytes, str]] = {
    "empty.jpg": (b"", "decode_failed"),
    "random.jpg": (np.random.default_rng(6).bytes(4096), "unsupported_format"),
    "error-page.jpg": (
        b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>Not Found</body></html>",
        "unsupported_format",
    ),
    "truncated.jpg": (JPEG[: len(JPEG) // 3], "decode_failed"),
    "truncated-late.jpg": (JPEG[: len(JPEG) * 9 // 10], "decode_failed"),
    "header-only.jpg": (JPEG[:600], "decode_failed"),
    "corrupt-middle.png": (zeroed(save(PHOTO, "PNG"), 200, 700), "decode_failed"),
    "bomb.png": (png_claiming(25_000, 25_000), "too_large"),
    "bomb.jpg": (jpeg_claiming(60_000, 60_000), "too_large"),
    "bomb.gif": (gif_claiming(65_535, 65_535), "too_large"),
    "bomb.bmp": (bmp_claiming(30_000, 30_000), "too_large"),
    "bomb.tiff": (tiff_claiming(40_000, 40_000), "too_large"),
    "over-byte-cap.jpg": (JPEG + b"\0" * MAX_IMAGE_BYTES, "too_large"),
    "netpbm.jpg": (save(PHOTO, "PPM"), "unsupported_format"),
    "icon.png": (save(PHOTO.resize((64, 48)), "ICO"), "unsupported_format"),
    "targa.jpg": (save(PHOTO, "TGA"), "unsupported_format"),
    "qoi.png": (save(PHOTO, "QOI"), "unsupported_format"),
    "vector.jpg": (
        b'<svg xmlns="http://www.w3.org/2000/svg" width="9e9" height="9e9"/>',
        "unsupported_format",
    ),
    "document.jpg": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "unsupported_format"),
    "heic.jpg": (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64, "unsupported_format"),
}
