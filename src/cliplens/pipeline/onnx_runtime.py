"""The ONNX Runtime backend (CPU; the `onnx` extra): both towers exported from the loaded weights,
the image tower optionally quantized to int8 where it keeps the vectors.

Export. The open_clip image and text towers are exported with torch's ONNX exporter (the
TorchScript-based one: seconds, not the dynamo one's tens of seconds, and node names that say
which layer a MatMul belongs to), batch dimension dynamic. Exports are kept in a folder keyed by
architecture, weights digest (of every parameter, so a changed weights file is a new key), opset
and cliplens version, under `CLIPLENS_EXPORT_DIR`; a restart loads them (a session in about a
second) instead of exporting again. Files are written under a temporary name and renamed, and a
file that will not load is rebuilt, not crashed on. Random weights are a new model at every
start, so they are exported to a temporary folder that is gone once the sessions hold them.

int8. Dynamic quantization (weights int8 per output channel, activations quantized per batch at
run time; no calibration set) of the image tower's MatMuls, chosen by measurement at every start:
every MatMul first (fastest), then only the MLP MatMuls, the first whose cosine to the float32
tower on the fidelity photos (generated photo-like images, or `CLIPLENS_FIDELITY_DIR`) clears the
floor (`CLIPLENS_INT8_MIN_COSINE`, `CLIPLENS_INT8_MEAN_COSINE`) is served; none clears it -> the
start fails, naming the measurement. The measurement is made on this machine because int8 kernels
differ by CPU (with and without VNNI). The text tower stays float32.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from PIL import Image

import cliplens
from cliplens.machine import usable_cpus
from cliplens.pipeline.model import ModelLoadError, weights_digest
from cliplens.pipeline.preprocess import PreprocessConfig, Preprocessor
from cliplens.settings import Settings

log = logging.getLogger(__name__)

OPSET = 17
FIDELITY_PHOTOS = 16
"""Generated photos int8 is measured on when no `CLIPLENS_FIDELITY_DIR` is set."""
MAX_FIDELITY_PHOTOS = 64
_PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def _mlp_matmuls(model: onnx.ModelProto) -> list[str]:
    return [node.name for node in model.graph.node if node.op_type == "MatMul" and "/mlp/" in node.name]


Selector = Callable[[onnx.ModelProto], list[str]] | None
"""Which MatMul nodes of a model int8 quantizes; None = all of them."""

INT8_CHOICES: tuple[tuple[str, Selector], ...] = (
    ("matmul", None),
    ("mlp", _mlp_matmuls),
)
"""Which MatMuls of the image tower int8 quantizes, fastest first; None = every MatMul."""


@dataclass
class OnnxBackend:
    """Two ONNX Runtime sessions on the CPU; float32 in, float32 projections out."""

    image: ort.InferenceSession
    text: ort.InferenceSession
    dtype_name: str
    digest: str
    fidelity: dict[str, str | float] = field(default_factory=dict)
    runtime: str = "onnxruntime"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    input_dtype: torch.dtype = torch.float32

    def embed_images(self, pixels: torch.Tensor) -> np.ndarray:
        output: np.ndarray = self.image.run(None, {"pixels": pixels.float().numpy()})[0]
        return output

    def embed_texts(self, ids: torch.Tensor) -> np.ndarray:
        output: np.ndarray = self.text.run(None, {"tokens": ids.to(torch.int64).numpy()})[0]
        return output

    def weights_digest(self) -> str:
        """Of the float32 weights the towers were exported from."""
        return self.digest

    def details(self) -> dict[str, str | float]:
        return dict(self.fidelity)


def build_onnx_backend(
    module: Any, settings: Settings, preprocess: PreprocessConfig, context_length: int, random_weights: bool
) -> OnnxBackend:
    """Export (or load the kept export of) both towers of the float32 CPU `module`, quantize the
    image tower when `CLIPLENS_DTYPE=int8`, and open the sessions."""
    started = time.perf_counter()
    digest = weights_digest(module)
    threads = settings.model_threads or usable_cpus()
    size = preprocess.size
    with _export_folder(settings, digest, random_weights) as folder:
        float_image = folder / "image.onnx"
        text = _opened(folder / "text.onnx", lambda path: _export_text(module, context_length, path), threads)

        def export_image(path: Path) -> None:
            _export_image(module, size, path)

        if settings.dtype != "int8":
            image = _opened(float_image, export_image, threads)
            backend = OnnxBackend(image, text, "float32", digest)
        else:

            def quantize(select: Selector, target: Path) -> None:
                _opened(float_image, export_image, threads)  # checked, or exported: a sound source
                _quantize(float_image, select, target)

            image, fidelity = _int8_image_session(module, settings, preprocess, folder, quantize, threads)
            backend = OnnxBackend(image, text, "int8", digest, fidelity)
    log.info(
        "onnxruntime sessions ready",
        extra={
            "seconds": round(time.perf_counter() - started, 2),
            "threads": threads,
            "kept": not random_weights,
        },
    )
    return backend


def export_root(settings: Settings) -> Path:
    if settings.export_dir is not None:
        return settings.export_dir
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "cliplens" / "onnx"


@contextlib.contextmanager
def _export_folder(settings: Settings, digest: str, random_weights: bool) -> Iterator[Path]:
    if random_weights:
        with tempfile.TemporaryDirectory(prefix="cliplens-onnx-") as temporary:
            yield Path(temporary)
        return
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(settings.model.removeprefix("local-dir:")).name)
    folder = export_root(settings) / f"{name}-{digest[:24]}-opset{OPSET}-cliplens{cliplens.__version__}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelLoadError(
            f"cannot create the ONNX export folder {folder} ({exc}); set CLIPLENS_EXPORT_DIR"
        ) from None
    yield folder


def _opened(path: Path, build: Callable[[Path], None], threads: int) -> ort.InferenceSession:
    """A session of `path`, built by `build` unless a loadable file is already there (a corrupt
    one is built again)."""
    if path.is_file():
        try:
            session = _session(path, threads)
            log.info("onnx export reused", extra={"path": str(path)})
            return session
        except Exception as exc:  # any load failure means: build it again
            log.warning(
                "onnx export will not load; building it again",
                extra={"path": str(path), "error": str(exc)[:200]},
            )
    started = time.perf_counter()
    _atomically(path, build)
    log.info(
        "onnx export written", extra={"path": str(path), "seconds": round(time.perf_counter() - started, 2)}
    )
    return _session(path, threads)


def _atomically(path: Path, build: Callable[[Path], None]) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        build(partial)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


class _Tower(torch.nn.Module):
    """One tower of the CLIP module as a module of its own (its weights as parameters, not constants)."""

    def __init__(self, clip: torch.nn.Module, method: str) -> None:
        super().__init__()
        self.clip = clip
        self.method = method

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = getattr(self.clip, self.method)(inputs)
        return output


def _export(tower: _Tower, sample: torch.Tensor, names: tuple[str, str], path: Path) -> None:
    # With grad enabled: under no_grad, torch takes the fused attention path, which does not export.
    with warnings.catch_warnings(), torch.inference_mode(False):
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
        torch.onnx.export(
            tower,
            (sample,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[names[0]],
            output_names=[names[1]],
            dynamic_axes={names[0]: {0: "batch"}, names[1]: {0: "batch"}},
        )


def _export_image(module: Any, size: tuple[int, int], path: Path) -> None:
    _export(_Tower(module, "encode_image"), torch.zeros(2, 3, *size), ("pixels", "image_embeds"), path)


def _export_text(module: Any, context_length: int, path: Path) -> None:
    sample = torch.zeros(2, context_length, dtype=torch.int64)
    sample[:, 0], sample[:, 1] = 1, 2  # any ids; the end-of-text pooling is traced as an argmax
    _export(_Tower(module, "encode_text"), sample, ("tokens", "text_embeds"), path)


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Decode and preprocessing share these cores: idle model threads must sleep, not spin.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _int8_image_session(
    module: Any,
    settings: Settings,
    preprocess: PreprocessConfig,
    folder: Path,
    quantize: Callable[[Selector, Path], None],
    threads: int,
) -> tuple[ort.InferenceSession, dict[str, str | float]]:
    """The first int8 choice whose fidelity clears the floor (see the module docstring)."""
    pixels, source = fidelity_pixels(settings, preprocess)
    with torch.inference_mode():
        reference = module.encode_image(pixels).numpy()
    measured = []
    for choice, select in INT8_CHOICES:
        session = _opened(folder / f"image-int8-{choice}.onnx", functools.partial(quantize, select), threads)
        vectors = session.run(None, {"pixels": pixels.numpy()})[0]
        low, mean = cosine_summary(reference, vectors)
        fidelity: dict[str, str | float] = {
            "quantized": choice,
            "int8_cosine_min": round(low, 5),
            "int8_cosine_mean": round(mean, 5),
            "fidelity_photos": f"{len(pixels)} {source}",
        }
        log.info("int8 fidelity measured", extra=fidelity)
        if low >= settings.int8_min_cosine and mean >= settings.int8_mean_cosine:
            return session, fidelity
        measured.append(f"{choice}: min {low:.4f}, mean {mean:.4f}")
    raise ModelLoadError(
        f"int8 does not keep the vectors of this model on this machine ({'; '.join(measured)} against "
        f"the floor min {settings.int8_min_cosine}, mean {settings.int8_mean_cosine}): "
        "serve CLIPLENS_DTYPE=float32, or lower CLIPLENS_INT8_MIN_COSINE / CLIPLENS_INT8_MEAN_COSINE"
    )


class _NoPreprocessingAdvice(logging.Filter):
    """onnxruntime's quantizer advises (on the root logger, as a warning) a pre-processing step
    that is for static quantization and crashes on these graphs: not for the operator's log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please consider to run pre-processing before quantization")


def _quantize(source: Path, select: Selector, target: Path) -> None:
    nodes = select(onnx.load(str(source))) if select is not None else None
    quiet = _NoPreprocessingAdvice()
    logging.getLogger().addFilter(quiet)
    try:
        quantize_dynamic(
            str(source),
            str(target),
            op_types_to_quantize=["MatMul"],
            nodes_to_quantize=nodes,
            per_channel=True,
            weight_type=QuantType.QInt8,
        )
    finally:
        logging.getLogger().removeFilter(quiet)


def cosine_summary(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """The lowest and the mean cosine between the rows of `a` and `b`."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    cosines = (a * b).sum(axis=1)
    return float(cosines.min()), float(cosines.mean())


def fidelity_pixels(settings: Settings, preprocess: PreprocessConfig) -> tuple[torch.Tensor, str]:
    """The normalised batch int8 is measured on, and what it is (`generated` or the folder)."""
    preprocessor = Preprocessor(preprocess, torch.device("cpu"))
    if settings.fidelity_dir is not None:
        files = sorted(p for p in settings.fidelity_dir.iterdir() if p.suffix.lower() in _PHOTO_SUFFIXES)
        if not files:
            raise ModelLoadError(
                f"CLIPLENS_FIDELITY_DIR={settings.fidelity_dir} holds no .jpg/.png/.webp photos"
            )
        images = []
        for path in files[:MAX_FIDELITY_PHOTOS]:
            with Image.open(path) as image:
                images.append(np.array(image.convert("RGB")))
        source = f"from {settings.fidelity_dir}"
    else:
        from cliplens.experiment.corpus import render_photo  # numpy + Pillow only

        images = [np.array(render_photo(seed, 384, 288)) for seed in range(FIDELITY_PHOTOS)]
        source = "generated"
    batch = preprocessor.normalize([preprocessor(pixels) for pixels in images], torch.float32)
    return batch, source
