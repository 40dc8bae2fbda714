from pathlib import Path

import pytest
import torch

from cliplens.pipeline.model import TorchBackend, cpu_has_native_bf16, model_id, resolve_dtype
from cliplens.settings import Settings
from tests.conftest import cosines


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu avx2 avx512f amx_bf16 amx_tile", True),
        ("fpu avx512f avx512_bf16", True),
        ("fpu avx2 avx512f avx512_vnni", False),
    ],
)
def test_native_bf16_is_read_from_cpu_flags(tmp_path: Path, flags: str, expected: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert cpu_has_native_bf16(cpuinfo) is expected


def test_auto_dtype_on_cpu_follows_the_hardware() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, native_bf16=lambda: True) == torch.bfloat16
    assert resolve_dtype("auto", cpu, native_bf16=lambda: False) == torch.float32
    assert resolve_dtype("float16", cpu, native_bf16=lambda: True) == torch.float16
    assert resolve_dtype("float32", cpu, native_bf16=lambda: True) == torch.float32


@pytest.mark.parametrize(
    ("model", "pretrained", "random", "expected"),
    [
        ("ViT-B-32", "laion2b_s34b_b79k", False, "ViT-B-32/laion2b_s34b_b79k"),
        ("ViT-B-32", "laion2b_s34b_b79k", True, "ViT-B-32/random"),
        ("ViT-B-32", "/models/clip/open_clip_pytorch_model.bin", False, "ViT-B-32/open_clip_pytorch_model"),
        ("local-dir:/models/tiny", "none", True, "tiny/random"),
        ("local-dir:/models/tiny", "none", False, "tiny/local"),
    ],
)
def test_model_id_names_architecture_and_weights(
    model: str, pretrained: str, random: bool, expected: str
) -> None:
    assert model_id(Settings(model=model, pretrained=pretrained), random) == expected


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_stays_within_cosine_0_999_of_float32(dtype: str) -> None:
    """The real ViT-B-32 architecture, weights cast once at load, against float32 (same seed)."""
    from cliplens.pipeline.model import load_model

    vectors = {}
    image = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(1)) * 4 - 2
    for name in ("float32", dtype):
        torch.manual_seed(0)
        model = load_model(Settings(model="ViT-B-32", pretrained="none", dtype=name))  # type: ignore[arg-type]
        assert model.dtype_name == name
        assert isinstance(model.backend, TorchBackend)
        assert next(model.backend.module.parameters()).dtype == getattr(torch, name)
        vectors[name] = model.encode_images(image)
    assert cosines(vectors["float32"], vectors[dtype]).min() >= 0.999
