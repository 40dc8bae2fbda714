import io

import numpy as np
import pytest
from PIL import Image

from cliplens.experiment.corpus import encode_jpeg, render_photo
from cliplens.pipeline.decode import BACKGROUND, decode_cost, decode_image, sniff_format
from cliplens.vocabulary import ErrorCode, ItemError
from tests.harness.hostile_bytes import jpeg_claiming, png_claiming

MIN_SIDE = 448
MAX_PIXELS = 100_000_000


def save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def code_of(data: bytes) -> ErrorCode:
    with pytest.raises(ItemError) as caught:
        decode_image(data, MIN_SIDE, MAX_PIXELS)
    return caught.value.code


def test_a_12mp_jpeg_is_decoded_in_the_dct_domain_but_keeps_enough_pixels() -> None:
    decoded = decode_image(encode_jpeg(render_photo(0, 4032, 3024)), MIN_SIDE, MAX_PIXELS)
    assert decoded.original_size == (4032, 3024)
    assert decoded.format == "JPEG"
    assert MIN_SIDE <= min(decoded.size) < 3024
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape[2] == 3


def test_exif_orientation_is_applied() -> None:
    decoded = decode_image(encode_jpeg(render_photo(0, 400, 300), orientation=6), MIN_SIDE, MAX_PIXELS)
    assert decoded.size == (300, 400)


def test_grayscale_becomes_three_equal_channels() -> None:
    gray = render_photo(0, 320, 240).convert("L")
    pixels = decode_image(save(gray, "JPEG"), MIN_SIDE, MAX_PIXELS).pixels
    assert pixels.shape == (240, 320, 3)
    assert np.array_equal(pixels[..., 0], pixels[..., 2])


def test_16_bit_png_is_scaled_not_clipped_to_white() -> None:
    ramp = np.tile(np.linspace(0, 65535, 256, dtype=np.uint16), (16, 1))
    pixels = decode_image(save(Image.fromarray(ramp), "PNG"), MIN_SIDE, MAX_PIXELS).pixels
    assert isinstance(pixels, np.ndarray)
    row = pixels[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert 120 <= row[128] <= 135
    assert (row == 255).sum() < 5


def test_transparency_is_composited_on_the_fixed_background() -> None:
    clear = Image.new("RGBA", (50, 40), (0, 0, 0, 0))
    pixels = decode_image(save(clear, "PNG"), MIN_SIDE, MAX_PIXELS).pixels
    assert tuple(pixels[10, 10]) == BACKGROUND
    palette = Image.new("P", (50, 40), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0])
    pixels = decode_image(save(palette, "PNG", transparency=0), MIN_SIDE, MAX_PIXELS).pixels
    assert tuple(pixels[5, 5]) == BACKGROUND


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = render_photo(2, 200, 150).convert("CMYK")
    decoded = decode_image(save(cmyk, "JPEG"), MIN_SIDE, MAX_PIXELS)
    assert decoded.pixels.shape == (150, 200, 3)


def test_an_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100)
    pixels = decode_image(buffer.getvalue(), MIN_SIDE, MAX_PIXELS).pixels
    assert pixels[0, 0, 0] > 200 and pixels[0, 0, 2] < 50


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", ErrorCode.DECODE_FAILED),
        (bytes(range(256)) * 4, ErrorCode.UNSUPPORTED_FORMAT),
        (b"<!DOCTYPE html><html><body>Not Found</body></html>", ErrorCode.UNSUPPORTED_FORMAT),
        (encode_jpeg(render_photo(0, 300, 200))[:2000], ErrorCode.DECODE_FAILED),
        (png_claiming(25_000, 25_000), ErrorCode.TOO_LARGE),
        (jpeg_claiming(60_000, 60_000), ErrorCode.TOO_LARGE),
    ],
    ids=["empty", "random", "html", "truncated-jpeg", "png-bomb", "jpeg-bomb"],
)
def test_hostile_bytes_get_their_code(data: bytes, expected: ErrorCode) -> None:
    assert code_of(data) == expected


def test_the_pixel_cap_is_a_setting() -> None:
    data = encode_jpeg(render_photo(0, 400, 300))
    with pytest.raises(ItemError) as caught:
        decode_image(data, MIN_SIDE, max_pixels=400 * 300 - 1)
    assert caught.value.code == ErrorCode.TOO_LARGE
    assert decode_image(data, MIN_SIDE, max_pixels=400 * 300).size == (400, 300)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize(
    "size", [(4032, 3024), (1920, 1080), (3000, 4000), (897, 1793), (449, 300), (100, 50)]
)
def test_the_cost_read_from_a_jpeg_frame_header_is_the_one_pillow_decodes_at(
    size: tuple[int, int], mode: str
) -> None:
    """decode_cost reads a JPEG's frame header itself (it runs on the event loop for every image);
    it must predict exactly the DCT-reduced size Pillow then decodes at."""
    data = save(Image.new(mode, size), "JPEG", quality=50)
    decoded = decode_image(data, MIN_SIDE, MAX_PIXELS)
    width, height = decoded.size
    assert decode_cost(data, MIN_SIDE, MAX_PIXELS) == width * height * 16
    with pytest.raises(ItemError) as caught:
        decode_cost(data, MIN_SIDE, size[0] * size[1] - 1)
    assert caught.value.code is ErrorCode.TOO_LARGE


def test_the_format_comes_from_the_signature_not_a_name() -> None:
    assert sniff_format(save(Image.new("RGB", (4, 4)), "PNG")) == "PNG"
    assert sniff_format(save(Image.new("RGB", (4, 4)), "WEBP")) == "WEBP"
    assert sniff_format(b"%PDF-1.7") is None


def test_device_decode_gives_a_chw_tensor_close_to_pillow() -> None:
    import torch

    from cliplens.pipeline.decode import decode_on_device

    data = encode_jpeg(render_photo(4, 640, 480), orientation=6)
    on_device = decode_on_device(data, torch.device("cpu"), MIN_SIDE, MAX_PIXELS)
    assert isinstance(on_device.pixels, torch.Tensor)
    assert tuple(on_device.pixels.shape) == (3, 640, 480)
    assert on_device.size == (480, 640)
    pillow = decode_image(data, 10_000, MAX_PIXELS).pixels
    assert isinstance(pillow, np.ndarray)
    difference = np.abs(on_device.pixels.permute(1, 2, 0).numpy().astype(int) - pillow.astype(int))
    assert difference.mean() < 1.5


def test_device_decode_keeps_the_header_checks_and_hands_other_formats_to_pillow() -> None:
    import torch

    from cliplens.pipeline.decode import decode_on_device

    cpu = torch.device("cpu")
    with pytest.raises(ItemError) as caught:
        decode_on_device(jpeg_claiming(60_000, 60_000), cpu, MIN_SIDE, MAX_PIXELS)
    assert caught.value.code == ErrorCode.TOO_LARGE
    png = decode_on_device(save(render_photo(1, 64, 48), "PNG"), cpu, MIN_SIDE, MAX_PIXELS)
    assert isinstance(png.pixels, np.ndarray)
    cmyk = decode_on_device(save(render_photo(2, 64, 48).convert("CMYK"), "JPEG"), cpu, MIN_SIDE, MAX_PIXELS)
    assert isinstance(cmyk.pixels, np.ndarray) and cmyk.pixels.shape == (48, 64, 3)


def with_end_marker(data: bytes, fraction: float) -> bytes:
    """The first `fraction` of a JPEG, closed with an end-of-image marker, as a broken copy leaves it."""
    return data[: int(len(data) * fraction)] + b"\xff\xd9"


PHOTO = render_photo(5, 1024, 768)


@pytest.mark.parametrize("fraction", [0.3, 0.9, 0.995])
@pytest.mark.parametrize(
    "data",
    [
        encode_jpeg(PHOTO),
        save(PHOTO, "JPEG", quality=95, subsampling=0, optimize=True),
        save(PHOTO.convert("L"), "JPEG"),
        save(PHOTO.convert("CMYK"), "JPEG"),
        save(PHOTO, "JPEG", restart_marker_blocks=4),
        save(Image.new("RGB", (800, 600), (128, 128, 128)), "JPEG"),
    ],
    ids=["camera", "444-optimised", "gray", "cmyk", "restart-markers", "mid-grey"],
)
@pytest.mark.parametrize("min_side", [MIN_SIDE, 10_000], ids=["dct-draft", "full-size"])
def test_a_jpeg_cut_short_and_closed_with_an_end_marker_is_decode_failed(
    data: bytes, fraction: float, min_side: int
) -> None:
    assert decode_image(data, min_side, MAX_PIXELS).size  # whole, it decodes
    with pytest.raises(ItemError) as caught:
        decode_image(with_end_marker(data, fraction), min_side, MAX_PIXELS)
    assert caught.value.code == ErrorCode.DECODE_FAILED
    assert "cut short" in caught.value.message


def test_a_progressive_jpeg_cut_before_its_last_scan_is_decode_failed() -> None:
    data = save(PHOTO, "JPEG", progressive=True)
    last_scan = data.rfind(b"\xff\xda")
    for cut in (len(data) // 50, len(data) // 4, last_scan - 100):
        with pytest.raises(ItemError) as caught:
            decode_image(data[:cut] + b"\xff\xd9", MIN_SIDE, MAX_PIXELS)
        assert caught.value.code == ErrorCode.DECODE_FAILED


@pytest.mark.parametrize(
    "image",
    [
        Image.new("RGB", (800, 600), (128, 128, 128)),
        Image.new("RGB", (97, 61), (128, 128, 128)),
        Image.new("L", (640, 480), 128),
        Image.new("CMYK", (640, 480), (128, 128, 128, 128)),
    ],
    ids=["rgb", "small-rgb", "gray", "cmyk"],
)
@pytest.mark.parametrize("progressive", [False, True])
def test_a_whole_jpeg_ending_in_flat_mid_grey_is_not_taken_for_a_cut_one(
    image: Image.Image, progressive: bool
) -> None:
    pixels = decode_image(save(image, "JPEG", progressive=progressive), MIN_SIDE, MAX_PIXELS).pixels
    assert pixels.shape[:2] == (image.height, image.width)


def test_device_decode_hands_a_jpeg_cut_short_to_pillow_which_refuses_it() -> None:
    import torch

    from cliplens.pipeline.decode import decode_on_device

    data = encode_jpeg(PHOTO)
    with pytest.raises(ItemError) as caught:
        decode_on_device(with_end_marker(data, 0.6), torch.device("cpu"), MIN_SIDE, MAX_PIXELS)
    assert caught.value.code == ErrorCode.DECODE_FAILED
    grey = save(Image.new("RGB", (640, 480), (128, 128, 128)), "JPEG")  # whole: Pillow decodes it
    assert decode_on_device(grey, torch.device("cpu"), MIN_SIDE, MAX_PIXELS).size == (640, 480)


def pillow_path(data: bytes, min_side: int, monkeypatch: pytest.MonkeyPatch) -> np.ndarray:
    """What Pillow's path alone decodes (the simplejpeg path declined)."""
    with monkeypatch.context() as patched:
        patched.setattr("cliplens.pipeline.decode._decode_jpeg", lambda *_: None)
        pixels = decode_image(data, min_side, MAX_PIXELS).pixels
    assert isinstance(pixels, np.ndarray)
    return pixels


@pytest.mark.parametrize(
    ("data", "min_side"),
    [
        *((encode_jpeg(render_photo(6, 640, 480), orientation=o), MIN_SIDE) for o in range(1, 9)),
        (encode_jpeg(render_photo(7, 4032, 3024)), MIN_SIDE),  # 1/4 scale
        (encode_jpeg(render_photo(7, 2048, 1536)), MIN_SIDE),  # 1/2, where libjpeg-turbo could do 3/8
        (encode_jpeg(render_photo(7, 2048, 1536)), 224),  # 1/4 (1/2 asked for 3/8's 576)
        (save(PHOTO.convert("L"), "JPEG"), MIN_SIDE),
        (save(PHOTO, "JPEG", progressive=True), MIN_SIDE),
        (save(PHOTO, "JPEG", restart_marker_blocks=4, subsampling=0), 10_000),  # full size
        (save(Image.new("RGB", (97, 61), (128, 128, 128)), "JPEG"), MIN_SIDE),
    ],
    ids=[
        *(f"orientation-{o}" for o in range(1, 9)),
        "12mp",
        "3mp",
        "3mp-224",
        "gray",
        "progressive",
        "full",
        "tiny",
    ],
)
def test_the_simplejpeg_path_gives_pillows_pixels_at_pillows_scale(
    data: bytes, min_side: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import simplejpeg

    calls: list[bytes] = []
    real = simplejpeg.decode_jpeg

    def spy(raw: bytes, **options: object) -> np.ndarray:
        calls.append(raw)
        decoded: np.ndarray = real(raw, **options)
        return decoded

    monkeypatch.setattr(simplejpeg, "decode_jpeg", spy)
    fast = decode_image(data, min_side, MAX_PIXELS).pixels
    assert calls, "an RGB or gray JPEG is decoded by simplejpeg"
    assert isinstance(fast, np.ndarray)
    assert np.array_equal(fast, pillow_path(data, min_side, monkeypatch)), "the same pixels, upright"


def test_what_simplejpeg_will_not_decode_strictly_goes_to_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stray byte before a marker is a libjpeg warning: simplejpeg (strict) refuses it, Pillow
    decodes it as it always did; CMYK never goes to simplejpeg."""
    data = encode_jpeg(PHOTO)
    scan = data.find(b"\xff\xda")
    stray = data[:scan] + b"\x00" + data[scan:]
    import simplejpeg

    with pytest.raises(ValueError):
        simplejpeg.decode_jpeg(stray, colorspace="RGB", strict=True)
    assert np.array_equal(
        decode_image(stray, MIN_SIDE, MAX_PIXELS).pixels, pillow_path(data, MIN_SIDE, monkeypatch)
    )

    monkeypatch.setattr(simplejpeg, "decode_jpeg", lambda *_, **__: pytest.fail("CMYK went to simplejpeg"))
    assert decode_image(save(PHOTO.convert("CMYK"), "JPEG"), MIN_SIDE, MAX_PIXELS).size == PHOTO.size
