"""Decoding: encoded bytes in, the RGB pixels a user would see out (the `decode` stage).

Only the pixels the model needs are decoded: a JPEG is decoded in the DCT domain at the smallest
scale (1/2, 1/4, 1/8) whose shorter side still covers `min_side`, which for a 12 MP phone photo is
16-64x less work than a full decode, and the final antialiased resize happens in `preprocess`.
An RGB or gray JPEG is decoded by libjpeg-turbo through simplejpeg (`_decode_jpeg`): the same
scale and the same pixels as Pillow's draft, straight into a numpy array, without Pillow's
chunked Python load loop and its copy out (CPU per decode, interleaved, on a 2-core AMD EPYC:
2 MP 4.8 ms against Pillow's 5.6, 12 MP 25.0 against 26.3). Anything it will not decode strictly
(a libjpeg warning is an error there: a file cut short, stray bytes), CMYK and an unreadable EXIF
block take Pillow's path, as before.
With `CLIPLENS_GPU_DECODE`, JPEGs are instead decoded by torchvision on the model's device
(nvJPEG on CUDA) into a tensor that never leaves it; other formats, and JPEGs that path cannot
take (CMYK), still go through Pillow.
The format is decided from the bytes' signature, never the file name, and the pixel count is
checked from the header before any pixel buffer is allocated. EXIF orientation is applied, and
CMYK, grayscale, 16-bit, palette and alpha images are each turned into 8-bit RGB explicitly.

A JPEG cut short and closed with an end-of-image marker (what a broken upload or a partial copy
leaves) is `decode_failed`, not embedded with a grey bottom: libjpeg only warns ("premature end of
data segment") and fills the missing blocks with grey, and neither Pillow nor torchvision reports
the warning. So the completeness is checked here, in two cheap steps (see `_check_scans` and
`_ran_out_early`): a progressive (or multi-scan) JPEG must refine every coefficient band it
started down to its last bit, checked from the scan headers before decoding; a single-scan JPEG
whose last pixels are libjpeg's grey fill is decoded once more without its closing marker, which
makes the decoder ask for more data exactly when the scan was cut. The residual blind spots are
documented at those functions.
"""

from __future__ import annotations

import io
import math
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import simplejpeg
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
        raise _too_many_pixels(width, height, max_pixels)
    return image, image_format


def _too_many_pixels(width: int, height: int, max_pixels: int) -> ItemError:
    return ItemError(ErrorCode.TOO_LARGE, f"{width}x{height} is more than the {max_pixels} pixels allowed")


def decode_on_device(data: bytes, device: torch.device, min_side: int, max_pixels: int) -> DecodedImage:
    """Decode a JPEG with torchvision on `device` (nvJPEG on CUDA); anything else via Pillow.

    The header checks (signature, pixel cap) are the same as `decode_image`'s, done before any
    pixel is decoded. Two things the device decoder does not do are done here: EXIF orientation
    (torchvision ignores `apply_exif_orientation` on CUDA) is read from the header and applied to
    the tensor, and a file that does not end with its EOI marker goes to Pillow, because nvJPEG
    decodes even 5% of a JPEG without an error (the rest comes out grey) where Pillow refuses it.
    For the same reason a JPEG whose last pixels come out as that grey goes to Pillow's path too,
    which tells a scan cut short (and closed with an appended marker) from a flat grey corner.
    """
    image, image_format = _open_checked(data, max_pixels)
    with image:
        size, mode = image.size, image.mode
        try:
            orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1))
        except (SyntaxError, ValueError, TypeError, OSError, struct.error):
            orientation = 0
        sequential = image_format == "JPEG" and _check_scans(data, image)
    complete = data.rstrip(b"\0")[-2:] == b"\xff\xd9"
    if image_format != "JPEG" or mode not in ("RGB", "L") or not complete or orientation not in _ORIENT:
        return decode_image(data, min_side, max_pixels)
    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        pixels = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=False)
    except RuntimeError:
        return decode_image(data, min_side, max_pixels)
    if sequential and _ends_in_grey_fill(pixels[:, -1, -_GREY_CORNER_PIXELS:].T.cpu().numpy()):
        return decode_image(data, min_side, max_pixels)  # possibly cut short: Pillow's path can tell
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

_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")
"""The marker after a scan's entropy-coded data: inside it, 0xFF is always followed by a stuffed
0x00 or a restart marker (RST0-RST7)."""

_READ_AHEAD_BYTES = 16
"""Zero bytes after a scan for libjpeg's read-ahead, so that a complete scan decodes without its
closing marker (it reads at most 7 bytes past its last block, measured over 72 encodings: baseline
and optimised tables, 4:4:4, 4:2:2, 4:2:0 and gray, qualities 50-100). A cut scan decodes at most
64 more blocks from them (each takes at least 2 bits), so any cut of more than 64 blocks is caught."""

_GREY_CORNER_PIXELS = 4
"""How many of the last pixels (bottom row, decoder orientation) must be libjpeg's grey fill for a
single-scan JPEG to be checked further. They lie in the last blocks decoded, the first to be lost."""


def _segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, start, end) of each JPEG marker segment after SOI, up to and including EOI.

    The walk follows each segment's length, so the markers of an EXIF thumbnail are never taken
    for the image's. For a scan (SOS) `end` is the end of its header; its entropy-coded data is
    stepped over only when the caller asks for the next segment, so finding the first scan header
    costs a few dozen steps, not a pass over the whole file.
    """
    position, size = 2, len(data)
    while position + 1 < size and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in (0x01, 0xD9) or 0xD0 <= marker <= 0xD7:  # no length field
            end = position + 2
        else:
            end = position + 2 + int.from_bytes(data[position + 2 : position + 4], "big")
        yield marker, position, end
        if marker == 0xD9:
            return
        if marker == 0xDA:
            found = _SCAN_END.search(data, end)
            end = size if found is None else found.start()
        position = end


def _check_scans(data: bytes, image: Image.Image) -> bool:
    """Raise `decode_failed` for a progressive (or multi-scan) JPEG cut short; return whether the
    JPEG is one sequential scan, whose completeness only its pixels can tell (`_ran_out_early`).

    A progressive JPEG sends each coefficient band in scans of successive bits; once cut, the scans
    that finish the bands already started are missing, which the scan headers show without decoding
    (one pass over the bytes, about 2% of the decode time of a 12 MP photo). Every component's DC
    must be finished, and every band some scan started must be refined to its last bit (Al = 0).
    Bands never started are not required: an encoder may leave all-zero bands out. Blind spots: a
    cut that removes only whole bands of an encoding without successive approximation, and a cut
    inside the last scan. With libjpeg's default script that scan is the last bit of the luminance's
    AC coefficients, often half the file; what a cut there loses is fine detail below the cut (on a
    1600x1200 photo cut at 40-90% of the bytes: 39-47 dB PSNR against the whole image, less change
    than re-saving it at quality 75), and no decoder available here reports it.
    """
    components = [layer[0] for layer in getattr(image, "layer", [])]
    segments = _segments(data)
    first = next((data[start + 4 : end] for marker, start, end in segments if marker == 0xDA), b"")
    if not first:
        return True  # no scan at all: the decoder reports it
    if not image.info.get("progressive") and first[0] >= len(components):
        return True
    started = dict.fromkeys(components, 1)
    finished = dict.fromkeys(components, 0)
    headers = [first, *(data[start + 4 : end] for marker, start, end in segments if marker == 0xDA)]
    for header in headers:
        count = header[0] if header else 0
        if count == 0 or len(header) < 4 + 2 * count:
            raise ItemError(ErrorCode.DECODE_FAILED, "the JPEG has a malformed scan header")
        low, high, approximation = header[1 + 2 * count : 4 + 2 * count]
        band = ((1 << (min(high, 63) + 1)) - 1) & ~((1 << low) - 1)
        for component in header[1 : 1 + 2 * count : 2]:
            if component in started:
                started[component] |= band
                if approximation & 0x0F == 0:
                    finished[component] |= band
    if any(started[component] & ~finished[component] for component in components):
        raise ItemError(
            ErrorCode.DECODE_FAILED, "the JPEG is cut short: its scans stop before the image is complete"
        )
    return False


def _ends_in_grey_fill(corner: np.ndarray) -> bool:
    """Whether the last pixels decoded, (pixels, channels) uint8, are libjpeg's fill for missing
    blocks: all coefficients zero, which is mid-grey (128) whatever the colour space. For RGB the
    luma is compared (chroma upsampling blends the neighbours' colour into the fill, never their
    luma); for gray and CMYK every channel. A natural photo passes this only where its last
    pixels are flat mid-grey, and then pays one more decode (`_ran_out_early`)."""
    values = corner.astype(np.int32)
    if values.shape[1] == 3:
        values = (values @ np.array([299, 587, 114], dtype=np.int32) + 500) // 1000
    return bool(np.all(np.abs(values - 128) <= 2))


def _corner(image: Image.Image) -> np.ndarray:
    """The last pixels of the bottom row, (pixels, channels), as the decoder wrote them."""
    width, height = image.size
    count = min(width, _GREY_CORNER_PIXELS)
    corner = np.asarray(image.crop((width - count, height - 1, width, height)))
    return corner.reshape(count, -1)


def _ran_out_early(data: bytes) -> bool:
    """Whether the (last) scan of a sequential JPEG ends before its last block.

    libjpeg cannot tell a cut scan from a whole one when a marker follows: it warns and fills the
    rest with grey. Without the marker it can: the scan is decoded again at 1/8 scale (the entropy
    decoding is the same work at any scale) from its bytes up to that marker plus
    `_READ_AHEAD_BYTES` zeros; a whole scan decodes, a cut one makes libjpeg ask for more data,
    which Pillow reports as a truncated file. Run only when `_ends_in_grey_fill` says so.
    """
    scan_end: int | None = None
    for marker, start, _ in _segments(data):
        if scan_end == -1:
            scan_end = start
        if marker == 0xDA:
            scan_end = -1
    if scan_end is None:
        return False
    cut = len(data) if scan_end == -1 else scan_end
    with _open_header(data[:cut] + bytes(_READ_AHEAD_BYTES), "JPEG") as probe:
        probe.draft(None, (1, 1))
        try:
            probe.load()
        except OSError:
            return True
    return False


def _reduce(image: Image.Image, image_format: str, min_side: int) -> None:
    """Before any pixel is decoded: have a JPEG decoded in the DCT domain at the smallest scale
    whose shorter side still covers `min_side` (its `size` becomes that scale's)."""
    width, height = image.size
    if image_format == "JPEG" and min(width, height) > min_side:
        scale = min_side / min(width, height)
        image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))


_CUT_SCAN = "the JPEG is cut short: its scan ends before its last block (an end marker was appended)"


def decode_image(data: bytes, min_side: int, max_pixels: int) -> DecodedImage:
    """Decode `data` to RGB pixels whose shorter side is at least `min_side` when the source allows.

    Raises ItemError: `unsupported_format`, `too_large` or `decode_failed`.
    """
    image, image_format = _open_checked(data, max_pixels)
    with image:
        width, height = image.size
        if image_format == "JPEG" and image.mode in ("RGB", "L"):
            pixels = _decode_jpeg(data, image, min_side)
            if pixels is not None:
                return DecodedImage(pixels, image_format, (width, height))
        _reduce(image, image_format, min_side)
        try:
            sequential = image_format == "JPEG" and _check_scans(data, image)
            image.load()
            if sequential and _ends_in_grey_fill(_corner(image)) and _ran_out_early(data):
                raise ItemError(ErrorCode.DECODE_FAILED, _CUT_SCAN)
            ImageOps.exif_transpose(image, in_place=True)  # not in place, it copies an upright image
            pixels = _to_rgb(image)
        except ItemError:
            raise
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
            raise ItemError(ErrorCode.DECODE_FAILED, f"the {image_format} data is corrupt: {exc}") from None
    return DecodedImage(pixels, image_format, (width, height))


def _decode_jpeg(data: bytes, header: Image.Image, min_side: int) -> np.ndarray | None:
    """An RGB or gray JPEG's upright RGB pixels, decoded by simplejpeg at the DCT scale Pillow's
    draft would use (`_draft_size`), so that size, memory and pixels are the same either way; the
    same completeness checks as Pillow's path. None: take Pillow's path (see the module docstring).
    """
    try:
        orientation = int(header.getexif().get(_EXIF_ORIENTATION, 1))
    except (SyntaxError, ValueError, TypeError, OSError, struct.error):
        return None
    sequential = _check_scans(data, header)
    width, height = _draft_size(*header.size, min_side)
    try:
        pixels = simplejpeg.decode_jpeg(
            data, colorspace="RGB", min_width=width, min_height=height, strict=True
        )
    except ValueError:
        return None
    if pixels.shape[:2] != (height, width):
        return None
    if sequential and _ends_in_grey_fill(pixels[-1, -_GREY_CORNER_PIXELS:]) and _ran_out_early(data):
        raise ItemError(ErrorCode.DECODE_FAILED, _CUT_SCAN)
    upright: np.ndarray = _ORIENT_HWC.get(orientation, _upright)(pixels)
    return upright


def _upright(pixels: np.ndarray) -> np.ndarray:
    return pixels


_ORIENT_HWC: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}
"""EXIF orientation -> the view of (height, width, 3) pixels that shows them upright, as
`ImageOps.exif_transpose` does (`_ORIENT` is the same for channels-first tensors)."""


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


def _peak_bytes_per_pixel(mode: str) -> int:
    """Peak bytes per decoded pixel of decode + preprocess, rounded up from measurements (12 MP
    images, VmHWM, torch 2.14 / Pillow 11): RGB and gray ~12-14, 16-bit gray ~18, RGBA ~27 (the
    alpha composite holds three RGBA copies at once)."""
    if mode in ("RGBA", "LA", "PA", "RGBa", "La", "P"):
        return 32
    if mode.startswith("I") or mode == "F":
        return 24
    return 16


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
"""Start-of-frame markers (baseline, progressive, lossless, arithmetic); C4/C8/CC are not frames."""


def _jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, components) from a JPEG's frame header, or None where it is not found.

    A walk over the marker segments (see `_segments`), which stops at the first scan: microseconds,
    where opening the header with Pillow also parses the EXIF block (~0.2 ms for a phone photo).
    """
    for marker, start, end in _segments(data):
        if marker in _SOF_MARKERS and end - start >= 10 and end <= len(data):
            height, width = struct.unpack(">HH", data[start + 5 : start + 9])
            return width, height, data[start + 9]
        if marker == 0xDA:
            return None
    return None


def _draft_size(width: int, height: int, min_side: int) -> tuple[int, int]:
    """The size `_reduce` makes Pillow decode a JPEG at: the DCT scale (1, 1/2, 1/4, 1/8) Pillow's
    `draft` picks for the request `_reduce` makes."""
    if min(width, height) <= min_side:
        return width, height
    scale = min_side / min(width, height)
    wanted = (math.ceil(width * scale), math.ceil(height * scale))
    ratio = min(width // wanted[0], height // wanted[1])
    step = next(s for s in (8, 4, 2, 1) if ratio >= s)
    return (width + step - 1) // step, (height + step - 1) // step


def decode_cost(data: bytes, min_side: int, max_pixels: int) -> int:
    """The bytes `decode_image` and the preprocess after it will hold at their peak for `data`,
    predicted from the header alone (after the DCT reduction a JPEG gets), so the memory budget
    can be reserved before any pixel buffer exists. A bad header raises the decode's own ItemError.

    This runs on the event loop for every image, so a JPEG's frame header is read directly; any
    other format, or a JPEG whose frame header is not where it should be, is opened with Pillow.
    """
    frame = _jpeg_frame(data) if sniff_format(data) == "JPEG" else None
    if frame is not None and frame[0] > 0 and frame[1] > 0 and frame[2] in (1, 3, 4):
        width, height, _ = frame
        if width * height > max_pixels:
            raise _too_many_pixels(width, height, max_pixels)
        width, height = _draft_size(width, height, min_side)
        return width * height * _peak_bytes_per_pixel("RGB")
    image, image_format = _open_checked(data, max_pixels)
    with image:
        _reduce(image, image_format, min_side)
        width, height = image.size
        return width * height * _peak_bytes_per_pixel(image.mode)
