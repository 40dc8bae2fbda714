"""open_clip's own preprocessing, the reference cliplens's decode + preprocess is held to, and a real
photo to hold it with (the one matplotlib ships: a camera JPEG, not a generated image).

The CPU tests (tests/unit/test_preprocess.py, tests/integration/test_correctness.py) and the GPU
tests (tests/gpu/test_cuda_paths.py) compare against the same reference with the same measure.
"""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib
import open_clip
import torch
from PIL import Image, ImageOps

REAL_PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def reference(data: bytes, cfg: dict[str, object] | None = None) -> torch.Tensor:
    """open_clip's inference transform of the fully decoded, EXIF-upright image in `data`."""
    transform = open_clip.transform.image_transform_v2(
        open_clip.transform.PreprocessCfg(**(cfg or {})), is_train=False
    )
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    tensor: torch.Tensor = transform(image)
    return tensor


def fidelity(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """The mean and the 99th percentile of the absolute difference between two tensors."""
    diff = (a - b).abs().flatten()
    return float(diff.mean()), float(diff.quantile(0.99))
