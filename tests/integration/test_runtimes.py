"""Model runtimes: torch and ONNX Runtime (float32 and int8) behind one backend seam, held to one
contract, to each other's vectors, and to the start-up rules (export kept, settings refused)."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cliplens.pipeline.model import LoadedModel, ModelLoadError, load_model, resolve_runtime
from cliplens.pipeline.preprocess import Preprocessor
from cliplens.settings import Settings
from tests.conftest import cosines, running, write_tiny_model
from tests.harness.servers import child_environment

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.onnx

VARIANTS = [("torch", "float32"), ("onnxruntime", "float32"), ("onnxruntime", "int8")]
TEXTS = ["a photo of a dog", "a mountain lake at dawn", "two people at a wedding"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("runtime-weights"), with_weights=True, seed=3)


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("exports")


def settings_for_vit(runtime: str, dtype: str, exports: Path) -> Settings:
    return dataclasses.replace(
        settings_for(Path("unused"), exports, runtime, dtype), model="ViT-B-32", pretrained="none"
    )


def settings_for(weights: Path, exports: Path, runtime: str, dtype: str, **more: object) -> Settings:
    return Settings(
        model=f"local-dir:{weights}",
        runtime=runtime,  # type: ignore[arg-type]
        dtype=dtype,  # type: ignore[arg-type]
        export_dir=exports,
        model_threads=2,
        **more,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def models(weights: Path, exports: Path) -> dict[tuple[str, str], LoadedModel]:
    return {variant: load_model(settings_for(weights, exports, *variant)) for variant in VARIANTS}


def photo_batch(model: LoadedModel, count: int = 6) -> torch.Tensor:
    """Photo-like images, through the service's own preprocessing."""
    from cliplens.experiment.corpus import render_photo

    preprocessor = Preprocessor(model.preprocess, model.device)
    images = [preprocessor(np.array(render_photo(100 + seed, 480, 360))) for seed in range(count)]
    return preprocessor.normalize(images, model.dtype)


@pytest.mark.parametrize("variant", VARIANTS, ids=["-".join(v) for v in VARIANTS])
def test_every_backend_keeps_the_contract(
    models: dict[tuple[str, str], LoadedModel], variant: tuple[str, str]
) -> None:
    model = models[variant]
    assert (model.runtime, model.dtype_name) == variant
    batch = photo_batch(model)
    images = model.encode_images(batch)
    texts = model.encode_texts(model.tokenize(TEXTS).ids)
    assert images.shape == (len(batch), model.dimension) and texts.shape == (len(TEXTS), model.dimension)
    assert images.dtype == np.float32 and np.isfinite(images).all() and np.isfinite(texts).all()
    assert np.array_equal(model.encode_images(batch), images), "the same batch gives the same vectors"
    alone = np.concatenate([model.encode_images(batch[i : i + 1]) for i in range(len(batch))])
    # int8 quantizes activations per batch, so a batch's other images move a vector a little
    floor = 0.995 if variant[1] == "int8" else 0.99999
    assert cosines(alone, images).min() >= floor, "a vector does not depend on its batch"


@pytest.mark.parametrize("variant", VARIANTS[1:], ids=["-".join(v) for v in VARIANTS[1:]])
def test_onnx_vectors_are_torch_vectors(
    models: dict[tuple[str, str], LoadedModel], variant: tuple[str, str]
) -> None:
    """Same weights, same space: float32 within 0.9999 of torch, int8 within its floor (texts: float32)."""
    reference, model = models[("torch", "float32")], models[variant]
    batch = photo_batch(reference, count=12)
    image_cosines = cosines(reference.encode_images(batch), model.encode_images(batch))
    text_cosines = cosines(
        reference.encode_texts(reference.tokenize(TEXTS).ids), model.encode_texts(model.tokenize(TEXTS).ids)
    )
    assert text_cosines.min() >= 0.9999
    if variant[1] == "float32":
        assert image_cosines.min() >= 0.9999
    else:
        assert image_cosines.min() >= 0.995 and image_cosines.mean() >= 0.998, image_cosines


def test_int8_reports_the_fidelity_it_measured(models: dict[tuple[str, str], LoadedModel]) -> None:
    described = models[("onnxruntime", "int8")].describe()
    assert described["runtime"] == "onnxruntime" and described["dtype"] == "int8"
    assert described["quantized"] in ("matmul", "mlp")
    assert 0.995 <= float(described["int8_cosine_min"]) <= float(described["int8_cosine_mean"]) <= 1.0
    assert described["fidelity_photos"] == "16 generated"
    assert "int8_cosine_min" not in models[("onnxruntime", "float32")].describe()


def test_int8_under_the_floor_is_refused_at_start(weights: Path, exports: Path) -> None:
    with pytest.raises(
        ModelLoadError, match=r"int8 does not keep the vectors.*CLIPLENS_DTYPE=float32"
    ) as caught:
        load_model(settings_for(weights, exports, "onnxruntime", "int8", int8_min_cosine=1.0))
    assert "matmul: min" in str(caught.value) and "mlp: min" in str(caught.value), (
        "both choices were measured"
    )


def test_fidelity_photos_can_be_the_operators_own(weights: Path, exports: Path, photo_dir: Path) -> None:
    folder = next(path.parent for path in photo_dir.rglob("*.jpg"))
    model = load_model(settings_for(weights, exports, "onnxruntime", "int8", fidelity_dir=folder))
    count = len(list(folder.glob("*.jpg")))
    assert model.describe()["fidelity_photos"] == f"{count} from {folder}"


def test_a_second_start_reuses_the_export_and_new_weights_make_a_new_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exports = tmp_path / "exports"
    weights = write_tiny_model(tmp_path / "model", with_weights=True, seed=5)
    settings = settings_for(weights, exports, "onnxruntime", "float32")
    first = load_model(settings)
    (folder,) = exports.iterdir()
    written = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    assert set(written) == {"image.onnx", "text.onnx"}
    with caplog.at_level(logging.INFO, logger="cliplens.pipeline.onnx_runtime"):
        second = load_model(settings)
    assert [r.getMessage() for r in caplog.records].count("onnx export reused") == 2
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == written
    batch = photo_batch(first, count=2)
    assert np.array_equal(first.encode_images(batch), second.encode_images(batch))

    other = write_tiny_model(tmp_path / "other", with_weights=True, seed=6)
    shutil.copy(other / "open_clip_pytorch_model.bin", weights)  # the same file name, new weights
    changed = load_model(settings)
    assert len(list(exports.iterdir())) == 2, "new weights are a new export"
    assert cosines(first.encode_images(batch), changed.encode_images(batch)).max() < 0.99


def test_a_corrupt_export_is_built_again(tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    weights = write_tiny_model(tmp_path / "model", with_weights=True, seed=7)
    settings = settings_for(weights, exports, "onnxruntime", "float32")
    reference = load_model(settings)
    (folder,) = exports.iterdir()
    (folder / "image.onnx").write_bytes(b"not an onnx model")
    (folder / "text.onnx").write_bytes((folder / "text.onnx").read_bytes()[:1000])
    rebuilt = load_model(settings)
    batch = photo_batch(reference, count=2)
    assert np.array_equal(reference.encode_images(batch), rebuilt.encode_images(batch))
    assert (folder / "image.onnx").stat().st_size > 1000
    assert not list(folder.glob(".*partial")), "no partial file is left behind"


def test_random_weights_leave_no_export_behind(
    tiny_model: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        load_model(
            Settings(
                model=tiny_model, runtime="onnxruntime", dtype="int8", export_dir=tmp_path, model_threads=2
            )
        )
    assert not list(tmp_path.iterdir()), "random weights are a new model at every start: nothing to keep"
    assert "pre-processing" not in caplog.text, "the quantizer's advice for static quantization is not logged"


def test_auto_picks_onnxruntime_only_where_torch_would_serve_float32() -> None:
    def pick(native_bf16: bool, installed: bool = True, **fields: str) -> str:
        settings = Settings(device="cpu", **fields)  # type: ignore[arg-type]
        return resolve_runtime(settings, installed=lambda: installed, native_bf16=lambda: native_bf16)

    assert pick(native_bf16=False) == "onnxruntime"
    assert pick(native_bf16=False, installed=False) == "torch"
    assert pick(native_bf16=True) == "torch", "torch bfloat16 beats both float32 runtimes there"
    assert pick(native_bf16=False, dtype="bfloat16") == "torch"
    assert pick(native_bf16=True, dtype="int8") == "onnxruntime", "int8 is ONNX Runtime's"
    cuda = Settings(device="cuda")
    assert resolve_runtime(cuda, installed=lambda: True, native_bf16=lambda: False) == "torch"


@pytest.mark.parametrize(
    ("fields", "installed", "fix"),
    [
        ({"runtime": "torch", "dtype": "int8"}, True, "set CLIPLENS_RUNTIME=onnxruntime"),
        ({"runtime": "onnxruntime"}, False, "pip install 'cliplens[onnx]'"),
        ({"runtime": "onnxruntime", "device": "cuda"}, True, "set CLIPLENS_DEVICE=cpu"),
        ({"runtime": "onnxruntime", "dtype": "bfloat16"}, True, "use float32 or int8"),
    ],
)
def test_a_combination_that_cannot_be_served_names_the_fix(
    fields: dict[str, str], installed: bool, fix: str
) -> None:
    with pytest.raises(ModelLoadError, match=fix.replace("[", r"\[").replace("]", r"\]")):
        resolve_runtime(Settings(**fields), installed=lambda: installed)  # type: ignore[arg-type]


def test_serve_with_int8_on_torch_exits_with_one_line(tiny_model: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cliplens.cli", "serve", "--port", "0"],
        env=child_environment(CLIPLENS_MODEL=tiny_model, CLIPLENS_RUNTIME="torch", CLIPLENS_DTYPE="int8"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = (
        "cliplens: CLIPLENS_DTYPE=int8 runs on ONNX Runtime only: "
        "set CLIPLENS_RUNTIME=onnxruntime (pip install 'cliplens[onnx]')"
    )
    assert done.returncode == 1 and line in done.stderr.splitlines(), done.stderr[-2000:]


def test_the_api_metrics_and_spans_say_which_runtime_served(
    settings: Settings, weights: Path, exports: Path
) -> None:
    int8 = dataclasses.replace(
        settings, model=f"local-dir:{weights}", runtime="onnxruntime", dtype="int8", export_dir=exports
    )
    with running(int8) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert (card["runtime"], card["device"], card["dtype"]) == ("onnxruntime", "cpu", "int8")
        assert card["fidelity"]["cosine_min"] >= 0.995 and card["fidelity"]["photos"] == "16 generated"
        answer = client.post("/v1/embeddings", json={"input": ["album/1/a.jpg", "album/2/c.jpg"]})
        assert answer.status_code == 200
        vectors = np.array([item["embedding"] for item in answer.json()["data"]])
        assert vectors.shape == (2, card["dimension"])
        assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5), (
            "the API normalises int8's vectors"
        )
        metrics = client.get("/metrics").text
    (info,) = [line for line in metrics.splitlines() if line.startswith("cliplens_model_info{")]
    assert 'runtime="onnxruntime"' in info and 'dtype="int8"' in info
    assert f'int8_cosine_min="{card["fidelity"]["cosine_min"]}"' in info


@pytest.mark.slow
def test_vit_b_32_on_onnxruntime_keeps_torchs_vectors(tmp_path: Path) -> None:
    """The real architecture (random weights, seeded alike): float32 within 0.9999 of torch float32,
    int8 within the default floor, on photo-like images and a real photo."""
    from tests.harness.open_clip_reference import REAL_PHOTO

    vectors = {}
    for runtime, dtype in VARIANTS:
        torch.manual_seed(0)
        model = load_model(settings_for_vit(runtime, dtype, tmp_path))
        batch = photo_batch(model, count=12)
        preprocessor = Preprocessor(model.preprocess, model.device)
        with Image.open(REAL_PHOTO) as photo:
            real = preprocessor.normalize([preprocessor(np.array(photo.convert("RGB")))], model.dtype)
        vectors[(runtime, dtype)] = model.encode_images(torch.cat([batch, real]))
    reference = vectors[("torch", "float32")]
    assert cosines(reference, vectors[("onnxruntime", "float32")]).min() >= 0.9999
    int8 = cosines(reference, vectors[("onnxruntime", "int8")])
    assert int8.min() >= 0.995 and int8.mean() >= 0.998, int8
