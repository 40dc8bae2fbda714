"""Preprocessing: RGB pixels in, the model's input tensor out (the `preprocess` stage).

The geometry follows the model's own open_clip preprocessing config exactly (resize mode, size,
interpolation, center crop or pad), done with torch ops on uint8 tensors, antialiased like PIL's
resize. The same code runs on the CPU (in the bounded executor) or on the GPU (the tensor is moved
once, from pinned memory). Normalisation (mean/std) is applied to whole batches on the model's
device by `normalize`, in the model's dtype.

The resize is Pillow's, to the pixel, on every device. On the CPU torch has Pillow's own uint8
kernel. Elsewhere (CUDA) torch resizes uint8 in float in one pass and rounds once, where Pillow
makes two passes (horizontal, then vertical) and rounds to 8 bits after each: on a full-size camera
photo (torchvision's CPU decode, as CLIPLENS_GPU_DECODE decodes) one float pass leaves 14% of the
values off Pillow's, by up to 6 levels (mean 0.0021, p99 0.015 against open_clip's own
preprocessing, half the p99 bound). So off the CPU `resize_like_pillow` makes Pillow's two passes in
float, rounding after each: 0.2% of the values 1 level off (ties), the rest equal, the same code
tested on the CPU (tests/unit/test_preprocess.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

_INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}


@dataclass(frozen=True)
class PreprocessConfig:
    """The subset of open_clip's PreprocessCfg that inference uses."""

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    @classmethod
    def from_open_clip(cls, cfg: Mapping[str, Any]) -> PreprocessConfig:
        """Build from the dict open_clip attaches to `model.visual.preprocess_cfg`."""
        size = cfg.get("size", 224)
        pair = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
        interpolation = str(cfg.get("interpolation", "bicubic"))
        resize_mode = str(cfg.get("resize_mode", "shortest"))
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"open_clip interpolation {interpolation!r} is not supported")
        if resize_mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"open_clip resize_mode {resize_mode!r} is not supported")
        mean = tuple(float(v) for v in cfg.get("mean", cls.mean))
        std = tuple(float(v) for v in cfg.get("std", cls.std))
        return cls(
            size=pair,
            mean=(mean[0], mean[1], mean[2]),
            std=(std[0], std[1], std[2]),
            interpolation=interpolation,
            resize_mode=resize_mode,
            fill_color=int(cfg.get("fill_color", 0)),
        )

    @property
    def min_side(self) -> int:
        """The shorter side decoding must keep: twice the model's input.

        JPEG DCT scaling is a cruder low-pass than the antialiased resize; keeping 2x leaves the
        final resize in charge of the result. Measured on a noisy 12 MP photo against open_clip's
        reference: 1.7x gave a mean error of 0.0096 (over the 0.005 bound), 3.3x gave 0.0036.
        """
        return 2 * max(self.size)


class Preprocessor:
    """Resize and crop one image to the model's input size, on `device`, keeping uint8."""

    def __init__(self, config: PreprocessConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self._interpolation = _INTERPOLATIONS[config.interpolation]
        std = torch.tensor(config.std, device=device).view(1, 3, 1, 1)
        mean = torch.tensor(config.mean, device=device).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std
        """(x / 255 - mean) / std == x * scale + shift: two passes over the batch instead of three."""

    def to_tensor(self, pixels: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 numpy -> (3, H, W) uint8 tensor on the device (pinned copy for CUDA)."""
        tensor = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1)
        if self.device.type == "cuda":
            return tensor.contiguous().pin_memory().to(self.device, non_blocking=True)
        return tensor

    def __call__(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """The model-sized uint8 image (3, H, W) for one decoded image (numpy HWC or tensor CHW)."""
        if isinstance(pixels, torch.Tensor):
            return self.resize_crop(pixels.to(self.device, non_blocking=True))
        return self.resize_crop(self.to_tensor(pixels))

    def resize_crop(self, image: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        height, width = cfg.size
        if cfg.resize_mode == "squash":
            return self._resize(image, [height, width])
        if cfg.resize_mode == "longest":
            scale = min(height / image.shape[-2], width / image.shape[-1])
            new_size = [round(image.shape[-2] * scale), round(image.shape[-1] * scale)]
            return _center_crop_or_pad(self._resize(image, new_size), height, width, cfg.fill_color)
        if height == width:
            new_size = shorter_side_to(image.shape[-2], image.shape[-1], height)
        else:
            scale = max(height / image.shape[-2], width / image.shape[-1])
            new_size = [round(image.shape[-2] * scale), round(image.shape[-1] * scale)]
        cropped: torch.Tensor = F.center_crop(self._resize(image, new_size), [height, width])
        return cropped

    def _resize(self, image: torch.Tensor, size: list[int]) -> torch.Tensor:
        """Pillow's uint8 kernel where torch has it (uint8 on the CPU), else `resize_like_pillow`."""
        if image.device.type == "cpu" and image.dtype == torch.uint8:
            resized: torch.Tensor = F.resize(image, size, interpolation=self._interpolation, antialias=True)
            return resized
        return resize_like_pillow(image, size, self._interpolation)

    def normalize(self, images: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """Stack uint8 images into one normalised batch on the device, in the model's dtype."""
        if self.device.type != "cpu":
            images = [img.to(self.device, non_blocking=True) for img in images]
        batch = torch.stack(list(images)).to(torch.float32)
        return batch.mul_(self._scale).add_(self._shift).to(dtype)


def shorter_side_to(height: int, width: int, side: int) -> list[int]:
    """[height, width] with the shorter side resized to `side`, the longer truncated as torchvision's
    (and so open_clip's) `Resize(side)` computes it."""
    if width <= height:
        return [int(side * height / width), side]
    return [side, int(side * width / height)]


def resize_like_pillow(
    image: torch.Tensor, size: list[int], interpolation: InterpolationMode
) -> torch.Tensor:
    """A (..., 3, H, W) uint8 image resized to `size` as Pillow's antialiased resize does it, on any
    device: a horizontal pass, then a vertical one, each rounded to 8 bits; a side already at its
    size is not resampled. uint8 out."""
    height, width = size
    pixels = image.to(torch.float32)
    if pixels.shape[-1] != width:
        pixels = F.resize(pixels, [pixels.shape[-2], width], interpolation=interpolation, antialias=True)
        pixels = pixels.round_().clamp_(0, 255)
    if pixels.shape[-2] != height:
        pixels = F.resize(pixels, [height, width], interpolation=interpolation, antialias=True)
        pixels = pixels.round_().clamp_(0, 255)
    return pixels.to(torch.uint8)


def _center_crop_or_pad(image: torch.Tensor, height: int, width: int, fill: int) -> torch.Tensor:
    pad_h = max(height - image.shape[-2], 0)
    pad_w = max(width - image.shape[-1], 0)
    if pad_h or pad_w:
        padding = [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2]
        image = F.pad(image, padding, fill=fill)
    cropped: torch.Tensor = F.center_crop(image, [height, width])
    return cropped
