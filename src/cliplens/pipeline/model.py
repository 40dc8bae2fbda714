"""The CLIP model: loading it as configured, and batch -> float32 projections (not normalised:
the API normalises unless asked for the raw projection, and the cache keeps the raw one).

Weights come from an open_clip pretrained tag (fetched and cached by open_clip), a local
checkpoint file, an open_clip `local-dir:` folder, or nowhere (`none`: random weights, whose
timings are real but whose vectors mean nothing; this is logged loudly and shown by /v1/models).
When tagged weights cannot be fetched, start-up fails with a message that says how to run
offline; only the demo may fall back to random weights, and it says so.

What runs the two towers is a `ModelBackend`, the one seam between the model and the rest of the
service (the batcher, the API and the telemetry see `LoadedModel`, which speaks through it):
`TorchBackend` here (CPU and CUDA), and ONNX Runtime on CPUs in `onnx_runtime.py` (the `onnx`
extra). Another runtime is one more module with such a class and one branch in `load_model`.
`CLIPLENS_RUNTIME=auto` picks ONNX Runtime float32 on a CPU without native bfloat16 when the
extra is installed (where torch would serve float32, which ONNX Runtime runs faster:
docs/PERFORMANCE.md), torch elsewhere (CUDA; CPUs with AMX or AVX512-BF16, where torch bfloat16
is faster than either float32); it never picks int8.

Under torch, the weights are cast to the serving dtype once, at load; there is no per-call
autocast, which is slow on the CPU. `dtype=auto` picks bfloat16 where the hardware has native bf16
matrix units (Intel AMX / AVX512-BF16 CPUs, CUDA GPUs that support it), float16 on other CUDA
GPUs, and float32 elsewhere.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import numpy as np
import open_clip
import torch

from cliplens.machine import usable_cpus
from cliplens.pipeline.preprocess import PreprocessConfig
from cliplens.settings import Settings

log = logging.getLogger(__name__)

_RANDOM = ("none", "random", "")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The configured model cannot be served; the message says what to do instead."""


def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AMX-BF16 or AVX512-BF16)."""
    try:
        flags = cpuinfo.read_text()
    except OSError:
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


def onnxruntime_installed() -> bool:
    """Whether the `onnx` extra (onnxruntime and onnx) is importable, without importing it."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


_EXTRA = "pip install 'cliplens[onnx]'"


def resolve_runtime(
    settings: Settings,
    installed: Callable[[], bool] | None = None,
    native_bf16: Callable[[], bool] = cpu_has_native_bf16,
) -> str:
    """`torch` or `onnxruntime` for these settings; ModelLoadError (naming the fix) for a
    combination that cannot be served. See the module docstring for what `auto` picks."""
    runtime, dtype, device = settings.runtime, settings.dtype, settings.device
    installed = installed or onnxruntime_installed
    if runtime == "auto":
        on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
        # Where torch would serve float32 anyway: with native bf16, torch bfloat16 is faster.
        picks_onnx = on_cpu and dtype in ("auto", "float32") and installed() and not native_bf16()
        runtime = "onnxruntime" if dtype == "int8" or picks_onnx else "torch"
    if runtime == "torch":
        if dtype == "int8":
            raise ModelLoadError(
                f"CLIPLENS_DTYPE=int8 runs on ONNX Runtime only: set CLIPLENS_RUNTIME=onnxruntime ({_EXTRA})"
            )
        return runtime
    if device == "cuda":
        raise ModelLoadError(
            "CLIPLENS_RUNTIME=onnxruntime runs on the CPU: "
            "set CLIPLENS_DEVICE=cpu, or CLIPLENS_RUNTIME=torch for CUDA"
        )
    if dtype not in ("auto", "float32", "int8"):
        raise ModelLoadError(
            f"CLIPLENS_DTYPE={dtype} is not served by ONNX Runtime: "
            "use float32 or int8, or CLIPLENS_RUNTIME=torch"
        )
    if not installed():
        raise ModelLoadError(f"CLIPLENS_RUNTIME=onnxruntime needs the onnx extra: {_EXTRA}")
    return runtime


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("CLIPLENS_DEVICE=cuda but torch sees no CUDA device")
    return torch.device(setting)


def resolve_dtype(
    setting: str, device: torch.device, native_bf16: Callable[[], bool] = cpu_has_native_bf16
) -> torch.dtype:
    """The weight dtype for `setting` on `device` (see the module docstring for `auto`)."""
    if setting != "auto":
        return _DTYPES[setting]  # int8 never comes here: resolve_runtime sends it to onnxruntime
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if native_bf16() else torch.float32


def model_id(settings: Settings, random_weights: bool) -> str:
    """The public name of the served model, e.g. `ViT-B-32/laion2b_s34b_b79k`."""
    name = settings.model
    if name.startswith("local-dir:"):
        name = Path(name.removeprefix("local-dir:")).name
    if random_weights:
        return f"{name}/random"
    if settings.model.startswith("local-dir:"):
        return f"{name}/local"
    pretrained = settings.pretrained
    if Path(pretrained).suffix in (".pt", ".pth", ".bin", ".safetensors", ".npz"):
        pretrained = Path(pretrained).stem
    return f"{name}/{pretrained}"


@dataclass(frozen=True, slots=True)
class Tokens:
    """Texts tokenised to the model's context: ids, and how long each text really is."""

    ids: torch.Tensor
    """(N, context_length) token ids; a text that did not fit is cut to the context, its last id
    the end-of-text token, as open_clip's tokenizer cuts it."""
    lengths: list[int]
    """Tokens each text needs, start and end included (more than the context: it was cut)."""


class ModelBackend(Protocol):
    """What runs the two towers. The batch arrives normalised, on `device`, in `input_dtype`."""

    @property
    def runtime(self) -> str:
        """`torch` or `onnxruntime`: the name /v1/models, the metrics and the spans report."""
        ...

    @property
    def device(self) -> torch.device: ...

    @property
    def input_dtype(self) -> torch.dtype: ...

    @property
    def dtype_name(self) -> str:
        """The weights as served: float32, bfloat16, float16, int8."""
        ...

    def embed_images(self, pixels: torch.Tensor) -> np.ndarray:
        """(N, 3, H, W) normalised pixels -> (N, D) float32 projections."""
        ...

    def embed_texts(self, ids: torch.Tensor) -> np.ndarray:
        """(N, context) token ids -> (N, D) float32 projections."""
        ...

    def weights_digest(self) -> str:
        """SHA-256 of the weights the vectors are a function of (see `weights_digest`)."""
        ...

    def details(self) -> dict[str, str | float]:
        """What else describes this runtime's vectors (int8: the fidelity measured at start)."""
        ...


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes and bytes): what the vectors
    are a function of, whatever file or tag the weights came from. Random weights are their own
    model at every start. About a second for ViT-B-32."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


@dataclass
class TorchBackend:
    """The open_clip module itself, cast to the serving dtype and placed on the device once."""

    module: Any
    device: torch.device
    input_dtype: torch.dtype
    runtime: str = "torch"
    _digest: str = field(default="", repr=False)

    @property
    def dtype_name(self) -> str:
        return str(self.input_dtype).removeprefix("torch.")

    @torch.inference_mode()
    def embed_images(self, pixels: torch.Tensor) -> np.ndarray:
        return _projections(self.module.encode_image(pixels.to(self.device, self.input_dtype)))

    @torch.inference_mode()
    def embed_texts(self, ids: torch.Tensor) -> np.ndarray:
        return _projections(self.module.encode_text(ids.to(self.device)))

    def weights_digest(self) -> str:
        """Of the weights as served, after the cast (computed once, when first asked)."""
        if not self._digest:
            self._digest = weights_digest(self.module)
        return self._digest

    def details(self) -> dict[str, str | float]:
        return {}


@dataclass
class LoadedModel:
    """A model ready to embed, with what the API reports about it; its backend runs the towers."""

    backend: ModelBackend
    tokenizer: Callable[..., torch.Tensor]
    """open_clip's: `tokenizer(texts, context_length=N)` -> (len(texts), N) ids."""
    id: str
    architecture: str
    preprocess: PreprocessConfig
    random_weights: bool
    dimension: int = 0
    context_length: int = 77
    """Tokens the text tower reads; a longer text is cut (`truncate`) or refused."""

    @property
    def runtime(self) -> str:
        return self.backend.runtime

    @property
    def device(self) -> torch.device:
        """Where the pixel batch goes (and the preprocessing runs)."""
        return self.backend.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the pixel batch is handed to the backend in."""
        return self.backend.input_dtype

    @property
    def dtype_name(self) -> str:
        return self.backend.dtype_name

    def describe(self) -> dict[str, str | float]:
        """Runtime, device and dtype, and the backend's details: for /v1/models, the info metric
        and the `embed batch` spans."""
        return {
            "runtime": self.runtime,
            "device": str(self.device),
            "dtype": self.dtype_name,
            **self.backend.details(),
        }

    def encode_images(self, batch: torch.Tensor) -> np.ndarray:
        """Normalised (N, 3, H, W) pixel batch on the device -> (N, D) float32 projections."""
        return self.backend.embed_images(batch)

    def tokenize(self, texts: Sequence[str]) -> Tokens:
        """Texts -> token ids on the CPU, each cut to the context, and each text's true length.

        One pass, one position past the context: a text whose ids reach that position did not fit.
        Only such texts are measured in full (the tokenizer caches the words it has seen)."""
        context = self.context_length
        wide = self.tokenizer(list(texts), context_length=context + 1)
        over = wide[:, context] != 0
        ids = wide[:, :context].clone()
        ids[over, context - 1] = wide[over, context]  # the end-of-text token, where it cuts a text
        lengths = (ids != 0).sum(dim=1).tolist()
        encode = getattr(self.tokenizer, "encode", None)
        for row in over.nonzero().flatten().tolist():
            lengths[row] = len(encode(texts[row])) + 2 if encode is not None else context + 1
        return Tokens(ids, lengths)

    def encode_texts(self, tokens: torch.Tensor) -> np.ndarray:
        """Token ids -> (N, D) float32 projections, through the CLIP text tower."""
        return self.backend.embed_texts(tokens)

    def weights_digest(self) -> str:
        return self.backend.weights_digest()

    def warm_up(self) -> None:
        """Run each tower once so the first request does not pay for lazy initialisation."""
        height, width = self.preprocess.size
        vectors = self.encode_images(torch.zeros(1, 3, height, width, device=self.device, dtype=self.dtype))
        self.encode_texts(self.tokenize(["a photo"]).ids)
        self.dimension = int(vectors.shape[1])


def _projections(features: torch.Tensor) -> np.ndarray:
    return features.float().cpu().numpy()


def _random_requested(pretrained: str) -> bool:
    return pretrained.strip().lower() in _RANDOM


def _check_reachable(settings: Settings) -> None:
    """Fail in seconds, not minutes of retries, when tagged weights are neither cached nor reachable."""
    cfg = open_clip.get_pretrained_cfg(settings.model, settings.pretrained)
    if not cfg:
        return
    hub_repo = str(cfg.get("hf_hub", "")).strip("/")
    if hub_repo:
        from huggingface_hub import constants, try_to_load_from_cache

        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(hub_repo, filename), str):
                return
        host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    else:
        host = urlparse(str(cfg.get("url", ""))).hostname or ""
    if not host:
        return
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as exc:
        raise ModelLoadError(_offline_help(settings, f"{host} is unreachable ({exc})")) from None


def _offline_help(settings: Settings, reason: str) -> str:
    return (
        f"cannot load pretrained weights {settings.model}/{settings.pretrained}: {reason}. "
        "To run offline, set CLIPLENS_PRETRAINED to a local checkpoint file "
        "(e.g. open_clip_pytorch_model.bin downloaded elsewhere), or to `none` for random weights "
        "(real timings, meaningless vectors)."
    )


def _create(settings: Settings, pretrained: str | None) -> Any:
    return open_clip.create_model(settings.model, pretrained=pretrained, device="cpu", precision="fp32")


def load_model(settings: Settings) -> LoadedModel:
    """Load the weights, build the runtime's backend, and warm it up."""
    runtime = resolve_runtime(settings)
    device = torch.device("cpu") if runtime == "onnxruntime" else resolve_device(settings.device)
    model, random_weights = _load_weights(settings)
    tokenizer = open_clip.get_tokenizer(settings.model)
    preprocess = PreprocessConfig.from_open_clip(getattr(model.visual, "preprocess_cfg", None) or {})
    context_length = int(getattr(model, "context_length", None) or tokenizer.context_length)
    backend: ModelBackend
    if runtime == "onnxruntime":
        from cliplens.pipeline.onnx_runtime import build_onnx_backend

        backend = build_onnx_backend(model.eval(), settings, preprocess, context_length, random_weights)
    else:
        dtype = resolve_dtype(settings.dtype, device)
        backend = TorchBackend(model.to(device=device, dtype=dtype).eval(), device, dtype)
    loaded = LoadedModel(
        backend=backend,
        tokenizer=tokenizer,
        id=model_id(settings, random_weights),
        architecture=settings.model,
        preprocess=preprocess,
        random_weights=random_weights,
        context_length=context_length,
    )
    loaded.warm_up()
    threads: dict[str, int | float] = {}
    cores = usable_cpus()
    if runtime == "torch" and device.type == "cpu" and not settings.model_threads and cores > 1:
        threads = size_model_threads(loaded, cores)
    log.info(
        "model loaded",
        extra={"model": loaded.id, "dim": loaded.dimension, **loaded.describe(), **threads},
    )
    return loaded


SPLIT_SLOWDOWN = 1.3
"""How much slower all the cores must make one image's forward pass than one thread does for the
model to get one thread (with `CLIPLENS_MODEL_THREADS=0`). Splitting an operator costs every
thread a hand-off: a model whose operators are too small to split runs slower on more threads,
and takes cores from the decode workers. The rule asks for a clear slowdown, not a lack of
speedup, because the two mistakes cost differently: one thread for a big model costs a third of
its throughput, all the cores for a tiny one about a millisecond of CPU per image; and because a
start-up timing can catch the other cores busy. Measured on 2 cores (AMD EPYC), one image: the
benchmark's one-layer free model 1.75-2.3x slower on two threads (2.0-2.7 ms against 1.2 ms);
ViT-B-32 1.3-1.4x faster on an idle machine, and from 1.4x faster to 1.07x slower when the
benchmark's servers started beside other work."""


def size_model_threads(loaded: LoadedModel, cores: int) -> dict[str, int | float]:
    """Give torch's intra-op pool `cores` threads, or one when they make a forward pass
    `SPLIT_SLOWDOWN` slower (timed here, on one image, after the warm-up). Threads that run torch
    later (the model worker, the decode workers) take the count set here; returns what was
    measured and chosen, for the log."""
    best = _image_pass_seconds(loaded, (1, cores))
    chosen = 1 if too_small_to_split(best[1], best[cores]) else cores
    torch.set_num_threads(chosen)
    return {
        "threads": chosen,
        "pass_ms_1_thread": round(best[1] * 1e3, 2),
        f"pass_ms_{cores}_threads": round(best[cores] * 1e3, 2),
    }


def too_small_to_split(one_thread_s: float, all_threads_s: float) -> bool:
    """Whether the model should get one intra-op thread (see `SPLIT_SLOWDOWN`)."""
    return all_threads_s >= SPLIT_SLOWDOWN * one_thread_s


def _image_pass_seconds(loaded: LoadedModel, counts: Sequence[int], rounds: int = 3) -> dict[int, float]:
    """{threads: the best of `rounds` forward passes of one image on that many intra-op threads}.
    The counts take turns, so that a moment of interference on the machine slows one round of
    each rather than all of one; each count gets an untimed pass first."""
    height, width = loaded.preprocess.size
    image = torch.zeros(1, 3, height, width, dtype=loaded.dtype)
    best = dict.fromkeys(counts, float("inf"))
    for timed in [False] + [True] * rounds:
        for threads in counts:
            torch.set_num_threads(threads)
            started = time.perf_counter()
            loaded.encode_images(image)
            if timed:
                best[threads] = min(best[threads], time.perf_counter() - started)
    return best


def _load_weights(settings: Settings) -> tuple[Any, bool]:
    """The open_clip model in float32 on the CPU, and whether its weights are random."""
    random_weights = _random_requested(settings.pretrained) and not settings.model.startswith("local-dir:")
    pretrained: str | None = (
        None if random_weights or settings.model.startswith("local-dir:") else settings.pretrained
    )
    try:
        if pretrained is not None and not Path(pretrained).is_file():
            _check_reachable(settings)
        model = _create(settings, pretrained)
    except (RuntimeError, FileNotFoundError, ValueError, ModelLoadError) as exc:
        if not settings.random_weights_fallback:
            if isinstance(exc, ModelLoadError):
                raise
            raise ModelLoadError(_offline_help(settings, str(exc))) from exc
        log.warning(
            "RANDOM WEIGHTS: pretrained weights could not be loaded, the demo goes on with random "
            "weights; timings are real, vectors are meaningless",
            extra={"reason": str(exc)[:300]},
        )
        random_weights = True
        model = _create(settings, None)
    if settings.model.startswith("local-dir:"):
        folder = Path(settings.model.removeprefix("local-dir:"))
        random_weights = not any(any(folder.glob(pattern)) for pattern in ("*.safetensors", "*.bin", "*.pth"))
    if random_weights:
        log.warning(
            "RANDOM WEIGHTS: the model has no trained weights; embeddings are meaningless",
            extra={"model": settings.model},
        )
    return model, random_weights
