"""Service settings: one frozen dataclass, read from the environment in exactly one function.

`load_settings()` is the only place in cliplens that reads `os.environ`; everything else gets a
`Settings` passed in, so tests build their own with `Settings(...)` or `dataclasses.replace`.
The `OTEL_*` variables listed here are read for the exporter, sampler and resource; any other
`OTEL_EXPORTER_OTLP_*` variable (headers, certificates, compression) is honoured by the
OpenTelemetry exporter itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16"]

_DEVICES: tuple[Device, ...] = ("auto", "cpu", "cuda")
_DTYPES: tuple[DType, ...] = ("auto", "float32", "bfloat16", "float16")
_Choice = TypeVar("_Choice", bound=str)


class SettingsError(ValueError):
    """An environment variable holds a value cliplens cannot use; the message names it."""


@dataclass(frozen=True)
class Settings:
    """Everything the service can be told. Defaults are what `cliplens serve` uses."""

    model: str = "ViT-B-32"
    """open_clip architecture name, or `local-dir:/path` holding an open_clip_config.json."""
    pretrained: str = "laion2b_s34b_b79k"
    """open_clip pretrained tag, a local checkpoint path, or `none` for random weights."""
    random_weights_fallback: bool = False
    """Start with random weights when the pretrained ones cannot be fetched (the demo only)."""
    device: Device = "auto"
    """`auto` picks CUDA when available, else the CPU."""
    dtype: DType = "auto"
    """Weight dtype; `auto` picks bfloat16 where the hardware runs it natively, else float32."""

    image_root: Path | None = None
    """Local directory source: bare object names resolve under it when no default bucket is set."""
    default_bucket: str | None = None
    """GCS bucket that bare object names resolve to; when set it is the default image source."""
    allowed_buckets: tuple[str, ...] = ()
    """Buckets a `gs://` URI may name (the default bucket is always allowed)."""
    gcs_emulator_host: str | None = None
    """`STORAGE_EMULATOR_HOST`: base URL of a GCS emulator such as fake-gcs-server."""
    allow_emulator: bool = False
    """`CLIPLENS_ALLOW_EMULATOR=1`: the emulator turns off authentication and TLS checks, so opt in."""
    download_timeout_s: float = 30.0
    """Longest a single download may take (also bounded by what is left of the request's deadline)."""
    download_retries: int = 3
    """Retries of a download after 429, 5xx or a broken connection (jittered exponential backoff)."""

    max_inputs: int = 256
    """Most items one request may carry; more gets 413."""
    max_body_bytes: int = 256 * 1024 * 1024
    """Largest request body accepted (JSON with data: URIs, or multipart uploads); more gets 413."""
    max_image_bytes: int = 64 * 1024 * 1024
    """Largest encoded image accepted from any source; larger items get `too_large`."""
    max_image_pixels: int = 100_000_000
    """Largest decoded image (width x height) accepted, checked from the header; more is `too_large`."""

    max_images_in_flight: int = 2048
    """Admission bound: images being served at once; a request beyond it gets 429 at once."""
    request_timeout_s: float = 120.0
    """Deadline of one request; items not done by then get `timeout`, the rest is returned."""
    shutdown_grace_s: float = 30.0
    """On SIGTERM, how long in-flight requests may take to finish before the process exits."""
    api_tokens: tuple[str, ...] = field(default=(), repr=False)
    """Bearer tokens accepted on the API routes; empty = no authentication."""

    cpu_workers: int = 0
    """Threads of the one process-wide decode/preprocess executor; 0 = the cores this process may use."""
    torch_threads: int = 0
    """torch intra-op threads for the model; 0 = the cores this process may use."""
    gpu_decode: bool = False
    """With a CUDA device, decode JPEGs on the GPU (nvJPEG through torchvision) instead of the CPU."""
    max_downloads: int = 32
    """Downloads in flight across all requests; the rest wait (visible as load queue time)."""
    max_batch: int = 32
    """Most images the model worker embeds in one forward pass."""
    batch_wait_ms: float = 2.0
    """How long the model worker may wait for a fuller batch, only while more images are on the way."""

    extremes_window_s: float = 15.0
    """Sliding window of the exact min/max gauges; keep it above the Prometheus scrape interval."""

    log_level: str = "INFO"
    """Level of the JSON log lines written to stderr."""

    service_name: str = "cliplens"
    """`OTEL_SERVICE_NAME`: the service name traces are filed under."""
    otlp_endpoint: str | None = None
    """`OTEL_EXPORTER_OTLP_ENDPOINT`: the collector's base URL (`/v1/traces` is added for HTTP)."""
    otlp_traces_endpoint: str | None = None
    """`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: the full traces URL, used as is; wins over the base URL."""
    otlp_protocol: Literal["grpc", "http/protobuf"] = "http/protobuf"
    """`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL`."""
    traces_sampler: str = "parentbased_always_on"
    """`OTEL_TRACES_SAMPLER`, one of the SDK's standard sampler names."""
    traces_sampler_arg: float | None = None
    """`OTEL_TRACES_SAMPLER_ARG`: the ratio for the `traceidratio` samplers."""
    resource_attributes: Mapping[str, str] = field(default_factory=dict)
    """`OTEL_RESOURCE_ATTRIBUTES`, parsed."""

    @property
    def buckets(self) -> frozenset[str]:
        """Every bucket a reference may name."""
        names = set(self.allowed_buckets)
        if self.default_bucket:
            names.add(self.default_bucket)
        return frozenset(names)


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be >= {minimum}")
    return value


def _float(env: Mapping[str, str], name: str, default: float | None) -> float | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if value < 0:
        raise SettingsError(f"{name}={value} must be >= 0")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name}={raw!r} is not a boolean (use 1/0, true/false, on/off)")


def _choice(env: Mapping[str, str], name: str, choices: tuple[_Choice, ...], default: _Choice) -> _Choice:
    raw = env.get(name, "").strip().lower()
    if raw == "":
        return default
    for choice in choices:
        if raw == choice:
            return choice
    raise SettingsError(f"{name}={raw!r} must be one of {', '.join(choices)}")


def _csv(raw: str | None) -> tuple[str, ...]:
    return tuple(part.strip() for part in (raw or "").split(",") if part.strip())


def _resource_attributes(raw: str | None) -> dict[str, str]:
    attributes: dict[str, str] = {}
    for pair in _csv(raw):
        key, sep, value = pair.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = value.strip()
    return attributes


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from `environ` (the process environment by default).

    Raises SettingsError for a value cliplens cannot use, and when `STORAGE_EMULATOR_HOST` is set
    without `CLIPLENS_ALLOW_EMULATOR=1`: gcloud-aio would then silently drop authentication and TLS
    verification, which must never happen by accident in production.
    """
    env = os.environ if environ is None else environ
    allow_emulator = _bool(env, "CLIPLENS_ALLOW_EMULATOR", False)
    if env.get("STORAGE_EMULATOR_HOST") and not allow_emulator:
        raise SettingsError(
            "STORAGE_EMULATOR_HOST is set, which turns off GCS authentication and TLS verification; "
            "set CLIPLENS_ALLOW_EMULATOR=1 if this is a development setup"
        )
    image_root = env.get("CLIPLENS_IMAGE_ROOT") or None
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    protocol = (protocol or "http/protobuf").strip().lower()
    if protocol not in ("grpc", "http/protobuf"):
        raise SettingsError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} must be grpc or http/protobuf")
    batch_wait = _float(env, "CLIPLENS_BATCH_WAIT_MS", Settings.batch_wait_ms)
    assert batch_wait is not None
    return Settings(
        model=env.get("CLIPLENS_MODEL") or Settings.model,
        pretrained=env.get("CLIPLENS_PRETRAINED") or Settings.pretrained,
        random_weights_fallback=_bool(env, "CLIPLENS_RANDOM_WEIGHTS_FALLBACK", False),
        device=_choice(env, "CLIPLENS_DEVICE", _DEVICES, "auto"),
        dtype=_choice(env, "CLIPLENS_DTYPE", _DTYPES, "auto"),
        image_root=Path(image_root) if image_root else None,
        default_bucket=env.get("CLIPLENS_DEFAULT_BUCKET") or None,
        allowed_buckets=_csv(env.get("CLIPLENS_ALLOWED_BUCKETS")),
        gcs_emulator_host=env.get("STORAGE_EMULATOR_HOST") or None,
        allow_emulator=allow_emulator,
        download_timeout_s=_float(env, "CLIPLENS_DOWNLOAD_TIMEOUT_S", Settings.download_timeout_s) or 1.0,
        download_retries=_int(env, "CLIPLENS_DOWNLOAD_RETRIES", Settings.download_retries),
        max_images_in_flight=_int(
            env, "CLIPLENS_MAX_IMAGES_IN_FLIGHT", Settings.max_images_in_flight, minimum=1
        ),
        request_timeout_s=_float(env, "CLIPLENS_REQUEST_TIMEOUT_S", Settings.request_timeout_s) or 1.0,
        shutdown_grace_s=_float(env, "CLIPLENS_SHUTDOWN_GRACE_S", Settings.shutdown_grace_s) or 0.0,
        api_tokens=_csv(env.get("CLIPLENS_API_TOKENS")),
        max_inputs=_int(env, "CLIPLENS_MAX_INPUTS", Settings.max_inputs, minimum=1),
        max_body_bytes=_int(env, "CLIPLENS_MAX_BODY_BYTES", Settings.max_body_bytes, minimum=1024),
        max_image_bytes=_int(env, "CLIPLENS_MAX_IMAGE_BYTES", Settings.max_image_bytes, minimum=1),
        max_image_pixels=_int(env, "CLIPLENS_MAX_IMAGE_PIXELS", Settings.max_image_pixels, minimum=1),
        cpu_workers=_int(env, "CLIPLENS_CPU_WORKERS", Settings.cpu_workers),
        torch_threads=_int(env, "CLIPLENS_TORCH_THREADS", Settings.torch_threads),
        gpu_decode=_bool(env, "CLIPLENS_GPU_DECODE", False),
        max_downloads=_int(env, "CLIPLENS_MAX_DOWNLOADS", Settings.max_downloads, minimum=1),
        max_batch=_int(env, "CLIPLENS_MAX_BATCH", Settings.max_batch, minimum=1),
        batch_wait_ms=batch_wait,
        extremes_window_s=_float(env, "CLIPLENS_EXTREMES_WINDOW_S", Settings.extremes_window_s) or 1.0,
        log_level=(env.get("CLIPLENS_LOG_LEVEL") or Settings.log_level).upper(),
        service_name=env.get("OTEL_SERVICE_NAME") or Settings.service_name,
        otlp_endpoint=env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
        otlp_traces_endpoint=env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or None,
        otlp_protocol="grpc" if protocol == "grpc" else "http/protobuf",
        traces_sampler=(env.get("OTEL_TRACES_SAMPLER") or Settings.traces_sampler).strip().lower(),
        traces_sampler_arg=_float(env, "OTEL_TRACES_SAMPLER_ARG", None),
        resource_attributes=_resource_attributes(env.get("OTEL_RESOURCE_ATTRIBUTES")),
    )
