"""The preprocessed tensor matches open_clip's own preprocessing of the fully decoded image."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from cliplens.experiment.corpus import encode_jpeg, render_photo
from cliplens.pipeline.decode import decode_image, decode_on_device
from cliplens.pipeline.preprocess import PreprocessConfig, Preprocessor, resize_like_pillow, shorter_side_to
from tests.harness.open_clip_reference import REAL_PHOTO, fidelity, reference


def ours(data: bytes, config: PreprocessConfig, device_decode: bool = False) -> torch.Tensor:
    """cliplens's decode + preprocess; `device_decode` takes the GPU decode path, here on the CPU."""
    preprocessor = Preprocessor(config, torch.device("cpu"))
    if device_decode:
        decoded = decode_on_device(data, torch.device("cpu"), config.min_side, 10**9)
    else:
        decoded = decode_image(data, config.min_side, 10**9)
    return preprocessor.normalize([preprocessor(decoded.pixels)], torch.float32)[0]


def cmyk_jpeg(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).convert("CMYK").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "data",
    [
        REAL_PHOTO.read_bytes(),
        encode_jpeg(render_photo(5, 4032, 3024)),
        encode_jpeg(render_photo(6, 3000, 4000), orientation=8),
        cmyk_jpeg(REAL_PHOTO),
    ],
    ids=["real-photo", "12mp-dct-scaled", "exif-rotated", "cmyk-real-photo"],
)
@pytest.mark.parametrize("device_decode", [False, True], ids=["pillow-decode", "device-decode"])
def test_matches_open_clip_reference_preprocessing(data: bytes, device_decode: bool) -> None:
    mean, p99 = fidelity(ours(data, PreprocessConfig(), device_decode), reference(data))
    assert mean <= 0.005
    assert p99 <= 0.03


@pytest.mark.parametrize("mode", ["squash", "longest"])
def test_other_resize_modes_follow_open_clip(mode: str) -> None:
    data = REAL_PHOTO.read_bytes()
    config = PreprocessConfig.from_open_clip({"resize_mode": mode, "size": 224})
    mine, theirs = ours(data, config), reference(data, {"resize_mode": mode})
    assert mine.shape == theirs.shape == (3, 224, 224)
    assert fidelity(mine, theirs)[0] <= 0.01


def test_the_output_is_the_model_size_in_uint8_before_normalising() -> None:
    preprocessor = Preprocessor(PreprocessConfig(), torch.device("cpu"))
    image = preprocessor(np.zeros((300, 500, 3), dtype=np.uint8))
    assert image.dtype == torch.uint8
    assert tuple(image.shape) == (3, 224, 224)


def test_normalize_is_the_textbook_formula_in_one_batch() -> None:
    """`normalize` folds (x / 255 - mean) / std into one multiply and one add; the batch it makes
    must be that formula, image by image, whatever the batch size."""
    config = PreprocessConfig()
    preprocessor = Preprocessor(config, torch.device("cpu"))
    images = [
        torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
        for i in range(5)
    ]
    mean = torch.tensor(config.mean).view(3, 1, 1)
    std = torch.tensor(config.std).view(3, 1, 1)
    batch = preprocessor.normalize(images, torch.float32)
    assert batch.shape == (5, 3, 224, 224) and batch.dtype == torch.float32
    for image, row in zip(images, batch, strict=True):
        expected = (image.float() / 255.0 - mean) / std
        assert torch.allclose(row, expected, atol=1e-5)
    assert torch.equal(preprocessor.normalize(images[2:3], torch.float32)[0], batch[2])
    assert preprocessor.normalize(images, torch.bfloat16).dtype == torch.bfloat16


def _full_decode(data: bytes) -> torch.Tensor:
    """All the pixels, as CLIPLENS_GPU_DECODE has them (its decode path, here on the CPU)."""
    pixels = decode_on_device(data, torch.device("cpu"), PreprocessConfig().min_side, 10**9).pixels
    assert isinstance(pixels, torch.Tensor)  # torchvision's decoder, not the Pillow fallback
    return pixels


@pytest.mark.parametrize(
    "data",
    [
        REAL_PHOTO.read_bytes(),
        encode_jpeg(render_photo(7, 1920, 1080)),
        encode_jpeg(render_photo(8, 1080, 1920)),
    ],
    ids=["real-photo", "2mp-landscape", "2mp-portrait"],
)
def test_the_resize_off_the_cpu_is_pillows_to_the_pixel(data: bytes) -> None:
    """The float resize CUDA gets (`resize_like_pillow`, run here on the CPU) against Pillow's own
    uint8 kernel (torch's on the CPU): at most 1 level apart, on under 0.5% of the values. One float
    pass rounded once, what torch does with uint8 off the CPU, is off on 4-14% of them."""
    image = _full_decode(data)
    size = shorter_side_to(image.shape[-2], image.shape[-1], 224)
    pillows = F.resize(image, size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    assert list(pillows.shape[-2:]) == size  # the size open_clip's Resize(224) makes
    ours = resize_like_pillow(image, size, InterpolationMode.BICUBIC)
    assert ours.dtype == torch.uint8 and ours.shape == pillows.shape
    apart = (ours.int() - pillows.int()).abs()
    assert apart.max() <= 1 and (apart > 0).float().mean() < 0.005
    one_pass = F.resize(image.float(), size, interpolation=InterpolationMode.BICUBIC, antialias=True)
    one_apart = (one_pass.round().clamp(0, 255).int() - pillows.int()).abs()
    assert (one_apart > 0).float().mean() > 0.02  # what the two passes are there for


@pytest.mark.parametrize("mode", ["shortest", "squash", "longest"])
def test_the_float_path_meets_open_clip_reference_in_every_resize_mode(mode: str) -> None:
    """A tensor torch cannot resize as uint8 where it is (a CUDA one; here a float one) takes
    `resize_like_pillow`, inside the preprocessor's geometry: well inside the fidelity bound."""
    data = REAL_PHOTO.read_bytes()
    preprocessor = Preprocessor(PreprocessConfig.from_open_clip({"resize_mode": mode}), torch.device("cpu"))
    image = preprocessor.resize_crop(_full_decode(data).float())
    assert image.dtype == torch.uint8 and tuple(image.shape) == (3, 224, 224)
    mean, p99 = fidelity(
        preprocessor.normalize([image], torch.float32)[0], reference(data, {"resize_mode": mode})
    )
    assert mean <= 0.0005 and p99 <= 0.001
