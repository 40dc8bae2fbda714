import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from cliplens.pipeline import model as model_module
from cliplens.pipeline.model import (
    TorchBackend,
    cpu_has_native_bf16,
    model_id,
    resolve_dtype,
    too_small_to_split,
)
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


@pytest.mark.parametrize(
    ("one_thread_ms", "all_threads_ms", "one_thread"),
    [
        (152.3, 112.6, False),
        (86.9, 89.5, False),
        (1.16, 2.03, True),
        (1.0, 1.25, False),
        (1.0, 1.3, True),
    ],
    ids=["vit-b-32-idle", "vit-b-32-busy-start", "free-model", "25pct-slower", "30pct-slower"],
)
def test_one_thread_only_when_more_make_a_pass_30pct_slower(
    one_thread_ms: float, all_threads_ms: float, one_thread: bool
) -> None:
    """The first three are passes measured on 2 cores (AMD EPYC): ViT-B-32 on an idle machine and
    in a benchmark server that started beside other work, and the free model."""
    assert too_small_to_split(one_thread_ms, all_threads_ms) is one_thread


@pytest.fixture
def torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _threads_of_a_new_thread() -> int:
    """What a thread started after the model loaded (the model worker, a decode worker) runs with."""
    seen: list[int] = []
    worker = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    worker.start()
    worker.join()
    return seen[0]


@pytest.mark.parametrize(("faster_on", "expected"), [("all", 2), ("one", 1)])
def test_the_count_chosen_at_load_is_what_later_threads_run_with(
    tiny_model: str,
    torch_threads: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    faster_on: str,
    expected: int,
) -> None:
    """Timings stand in for a big and a small model; what is under test is that the count chosen
    at load is the one later threads run torch with, and that the log says what was measured."""
    timed: list[int] = []

    def pass_seconds(loaded: object, counts: tuple[int, ...]) -> dict[int, float]:
        timed.extend(counts)
        return {"all": {1: 0.2, 2: 0.1}, "one": {1: 0.001, 2: 0.003}}[faster_on]

    monkeypatch.setattr(model_module, "usable_cpus", lambda: 2)
    monkeypatch.setattr(model_module, "_image_pass_seconds", pass_seconds)
    torch.set_num_threads(2)
    with caplog.at_level(logging.INFO, logger="cliplens.pipeline.model"):
        model_module.load_model(Settings(model=tiny_model, pretrained="none", dtype="float32"))
    assert sorted(timed) == [1, 2]
    assert _threads_of_a_new_thread() == expected
    (loaded,) = [r for r in caplog.records if r.getMessage() == "model loaded"]
    assert (loaded.threads, loaded.pass_ms_1_thread, loaded.pass_ms_2_threads) == (  # type: ignore[attr-defined]
        expected,
        *((200.0, 100.0) if faster_on == "all" else (1.0, 3.0)),
    )


def test_an_operators_thread_count_is_not_second_guessed(
    tiny_model: str, torch_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def pass_seconds(loaded: object, counts: tuple[int, ...]) -> dict[int, float]:
        raise AssertionError("timed although CLIPLENS_MODEL_THREADS was set")

    monkeypatch.setattr(model_module, "usable_cpus", lambda: 2)
    monkeypatch.setattr(model_module, "_image_pass_seconds", pass_seconds)
    torch.set_num_threads(2)
    model_module.load_model(Settings(model=tiny_model, pretrained="none", dtype="float32", model_threads=2))
    assert _threads_of_a_new_thread() == 2


def test_passes_are_timed_at_each_thread_count_asked(
    tiny_model: str, torch_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(model=tiny_model, pretrained="none", dtype="float32", model_threads=1)
    loaded = model_module.load_model(settings)
    seen: list[int] = []
    encode = loaded.encode_images

    def counting(batch: torch.Tensor) -> np.ndarray:
        seen.append(torch.get_num_threads())
        return encode(batch)

    monkeypatch.setattr(loaded, "encode_images", counting)
    best = model_module._image_pass_seconds(loaded, (1, 2), rounds=3)
    assert seen == [1, 2] * 4, "one untimed pass each, then three rounds taking turns"
    assert set(best) == {1, 2} and all(0 < seconds < 10 for seconds in best.values())
