"""Files that lie about themselves, built in the tests (no large binaries in the repository)."""

from __future__ import annotations

import struct
import zlib

from cliplens.experiment.corpus import encode_jpeg, render_photo


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
