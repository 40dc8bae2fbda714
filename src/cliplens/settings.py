"""Service settings: one frozen dataclass, read from the environment in exactly one function.

`load_settings()` is the only place in cliplens that reads `os.environ`; everything else gets a
`Settings` passed in, so tests build their own with `Settings(...)` or `dataclasses.replace`.
Each field is read from `CLIPLENS_<FIELD NAME>` unless its annotation names other variables; an
empty variable counts as unset. The `OTEL_*` variables listed here choose the exporter and where it
sends; the OpenTelemetry SDK reads its other standard variables itself (the sampler, the resource
and service name, `OTEL_SDK_DISABLED`, the exporter's headers, certificates and compression; see
telemetry/tracing.py), and the HTTP instrumentation `OTEL_SEMCONV_STABILITY_OPT_IN`.

Parsing is pydantic's, applied to the plain dataclass through a TypeAdapter: the constraints sit in
each field's annotation, its booleans take 1/0 true/false yes/no on/off and its errors name the
variable, where msgspec would need hand-written hooks for paths, on/off and choices, and
pydantic-settings would turn `Settings` into a model that `dataclasses.replace` cannot copy.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BeforeValidator,
    Field,
    TypeAdapter,
    ValidationError,
    with_config,
)

Device = Literal["auto", "cpu", "cuda"]
DType = Literal["auto", "float32", "bfloat16", "float16", "int8"]
ModelRuntime = Literal["auto", "torch", "onnxruntime"]
OnError = Literal["fail", "partial"]


class SettingsError(ValueError):
    """An environment variable holds a value cliplens cannot use; the message names it."""


def _env(*names: str) -> Any:
    """Read a field from these variables (the first set one wins) instead of `CLIPLENS_<FIELD>`."""
    return Field(validation_alias=AliasChoices(*names))


def _csv(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


_Lower = BeforeValidator(str.lower)
_Upper = BeforeValidator(str.upper)
_Csv = BeforeValidator(_csv)
_AtLeastOne = Field(ge=1)
_NotNegative = Field(ge=0)
# A zero deadline or window would fail every request (or empty every gauge), so it is refused.
_Positive = Field(gt=0)
_HOST_NAME = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)(?:\.(?!-)[a-z0-9_-]{1,63}(?<!-))*\.?$")


def _hosts(entries: tuple[str, ...]) -> tuple[str, ...]:
    """Each entry a host name, an IP address or `*`; a wildcard anywhere else is refused, since
    `example.com` already allows its subdomains."""
    for entry in entries:
        host = entry.lower().strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            with contextlib.suppress(UnicodeError):  # a Unicode name: checked in its IDNA form
                host = host.encode("idna").decode("ascii")
            if host != "*" and not _HOST_NAME.match(host):
                raise ValueError(
                    f"{entry!r} is not a host name (`example.com` allows it and its subdomains, `*` any host)"
                ) from None
    return entries


_Hosts = AfterValidator(_hosts)


@with_config(alias_generator=lambda name: f"CLIPLENS_{name.upper()}")
@dataclass(frozen=True)
class Settings:
    """Everything the service can be told. Defaults are what `cliplens serve` uses."""

    model: str = "ViT-B-32"
    """open_clip architecture name, or `local-dir:/path` holding an open_clip_config.json."""
    pretrained: str = "laion2b_s34b_b79k"
    """open_clip pretrained tag, a local checkpoint path, or `none` for random weights."""
    random_weights_fallback: bool = False
    """Start with random weights when the pretrained ones cannot be fetched (the demo only)."""
    device: Annotated[Device, _Lower] = "auto"
    """`auto` picks CUDA when available, else the CPU."""
    dtype: Annotated[DType, _Lower] = "auto"
    """Weight dtype; `auto` picks bfloat16 where torch runs it natively, else float32; `int8` is
    ONNX Runtime's (image tower quantized, refused below the fidelity floor)."""
    runtime: Annotated[ModelRuntime, _Lower] = "auto"
    """`torch`, `onnxruntime` (CPU; `pip install 'cliplens[onnx]'`), or `auto`: ONNX Runtime
    float32 on a CPU without native bfloat16 when installed, else torch."""
    export_dir: Path | None = None
    """Where ONNX exports are kept between starts; unset = $XDG_CACHE_HOME/cliplens/onnx."""
    int8_min_cosine: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.995
    """int8 is refused when its lowest cosine to float32 on the fidelity photos is under this."""
    int8_mean_cosine: Annotated[float, Field(ge=-1.0, le=1.0)] = 0.998
    """int8 is refused when its mean cosine to float32 on the fidelity photos is under this."""
    fidelity_dir: Path | None = None
    """Photos int8 fidelity is measured on at start (up to 64); unset = generated photo-like images."""

    image_root: Path | None = None
    """Local directory source: bare object names resolve under it when no default bucket is set."""
    default_bucket: str | None = None
    """GCS bucket that bare object names resolve to; when set it is the default image source."""
    allowed_buckets: Annotated[tuple[str, ...], _Csv] = ()
    """Buckets a `gs://` URI may name, comma-separated (the default bucket is always allowed)."""
    gcs_emulator_host: Annotated[str | None, _env("STORAGE_EMULATOR_HOST")] = None
    """`STORAGE_EMULATOR_HOST`: base URL of a GCS emulator such as fake-gcs-server."""
    allow_emulator: bool = False
    """`CLIPLENS_ALLOW_EMULATOR=1`: the emulator turns off authentication and TLS checks, so opt in."""
    download_timeout_s: Annotated[float, _Positive] = 30.0
    """Longest a single download may take (also bounded by what is left of the request's deadline)."""
    download_retries: Annotated[int, _NotNegative] = 3
    """Retries of a download after 429, 5xx or a broken connection (jittered exponential backoff)."""
    url_hosts: Annotated[tuple[str, ...], _Csv, _Hosts] = ()
    """Hosts `https://` image URLs may name, comma-separated (`example.com` also allows the hosts
    under it, `*` any host); unset = URL inputs are refused (pipeline/urls.py has the SSRF rules)."""
    url_allow_http: bool = False
    """`CLIPLENS_URL_ALLOW_HTTP=1`: also fetch `http://` URLs (same hosts and address rules)."""
    url_allow_loopback: bool = False
    """For tests only: URLs may reach loopback (127.0.0.0/8, ::1); never other non-public addresses."""

    max_inputs: Annotated[int, _AtLeastOne] = 256
    """Most items one request may carry; more gets 413."""
    max_body_bytes: Annotated[int, Field(ge=1024)] = 256 * 1024 * 1024
    """Largest request body accepted (JSON with data: URIs, or multipart uploads); more gets 413."""
    max_image_bytes: Annotated[int, _AtLeastOne] = 64 * 1024 * 1024
    """Largest encoded image accepted from any source; larger items get `too_large`."""
    max_image_pixels: Annotated[int, _AtLeastOne] = 100_000_000
    """Largest decoded image (width x height) accepted, checked from the header; more is `too_large`."""

    max_text_chars: Annotated[int, _AtLeastOne] = 2000
    """Longest text accepted, in characters, checked before tokenising (the tokenizer is quadratic
    in long runs of letters); longer is `text_too_long`, or cut to this length with `truncate`."""
    on_error: Annotated[OnError, _Lower] = "fail"
    """What a request gets when some of its items fail and it does not say (`on_error`): `fail` (422
    `item_errors` listing them, what OpenAI-style clients assume) or `partial` (200, indexed vectors
    of the rest, and the errors)."""

    max_images_in_flight: Annotated[int, _AtLeastOne] = 2048
    """Admission bound: items (images and texts) being served at once. A request that would pass it
    gets 429 at once; a request larger than the bound by itself gets 413."""
    memory_budget_bytes: Annotated[int, Field(ge=16 * 1024 * 1024)] = 1024 * 1024 * 1024
    """Bytes that bodies, encoded images, predicted decoded pixels and model tensors may hold at
    once (pipeline/budget.py); work beyond it waits, a request that cannot start gets 429."""
    request_timeout_s: Annotated[float, _Positive] = 120.0
    """Deadline of one request; items not done by then get `timeout`, the rest is returned."""
    shutdown_grace_s: Annotated[float, _NotNegative] = 30.0
    """On SIGTERM, how long in-flight requests may take to finish before the process exits (0 = none)."""
    header_timeout_s: Annotated[float, _Positive] = 10.0
    """Longest time from a connection (or the first byte of its next request) to the end of the
    request headers; then the connection is closed (408 if part of a request had arrived)."""
    body_timeout_s: Annotated[float, _Positive] = 30.0
    """Longest wait for the next piece of a request body; then 408 and the connection is closed."""
    max_connections: Annotated[int, _AtLeastOne] = 1024
    """Open connections at most; one more is answered 429 `overloaded` at once and closed."""
    ready_requires_storage: bool = False
    """`/readyz` fails while the image directory or the default bucket fails its check (every 30 s)."""
    served_model_name: str | None = None
    """Another name the model answers to in requests' `model` and is listed under by /v1/models
    (e.g. the name clients were written against); its own id and architecture still work."""
    cors_origins: Annotated[tuple[str, ...], _Csv] = ()
    """Browser origins allowed to call the API (CORS), comma-separated, or `*`; empty = none."""
    gzip_min_bytes: Annotated[int, _NotNegative] = 0
    """Responses at least this large are gzip-compressed for clients that accept it; 0 = never
    (compression runs on the event loop: ~12 ms per MB of JSON vectors, for a 2x saving)."""
    api_tokens: Annotated[tuple[str, ...], _Csv] = field(default=(), repr=False)
    """Bearer tokens accepted on the API routes, comma-separated; empty = no authentication."""

    cpu_workers: Annotated[int, _NotNegative] = 0
    """Threads of the one process-wide decode/preprocess executor; 0 = the cores this process may use."""
    model_threads: Annotated[int, _NotNegative, _env("CLIPLENS_MODEL_THREADS", "CLIPLENS_TORCH_THREADS")] = 0
    """Intra-op threads of the model runtime (`CLIPLENS_TORCH_THREADS` still works); 0 = the cores
    this process may use, except for a torch model on the CPU whose forward pass they make at least
    1.3x slower (timed at start-up, on one image): a model too small to split gets one."""
    gpu_decode: bool = False
    """With a CUDA device, decode JPEGs on the GPU (nvJPEG through torchvision) instead of the CPU."""
    max_downloads: Annotated[int, _AtLeastOne] = 32
    """Downloads in flight across all requests; the rest wait (visible as load queue time)."""
    max_batch: Annotated[int, _AtLeastOne] = 32
    """Most images the model worker embeds in one forward pass."""
    batch_wait_ms: Annotated[float, _NotNegative] = 20.0
    """How long the model worker may wait for a fuller batch: only while more images are on the way,
    none of those queued is the last one its request waits for, and the last forward pass took less
    than this (a slower model fills its batches while it works)."""

    cache_bytes: Annotated[int, _NotNegative] = 256 * 1024 * 1024
    """Bound of the in-process embedding cache (pipeline/cache.py), in bytes; 0 turns it off."""
    cache_url: Annotated[str | None, Field(pattern=r"^(redis|rediss|unix)://")] = field(
        default=None, repr=False
    )
    """Shared cache tier for every replica, e.g. `redis://cache:6379/0` (Redis or Valkey); unset = none."""
    cache_ttl_s: Annotated[int, _NotNegative] = 30 * 24 * 3600
    """How long an entry lives in the shared tier, in seconds (0 = until the server evicts it)."""
    cache_timeout_ms: Annotated[float, _Positive] = 50.0
    """Longest one shared-tier operation may take; then it counts as an error and is bypassed."""
    cache_connections: Annotated[int, _AtLeastOne] = 16
    """Connections to the shared tier per process; an operation that finds none free within the
    timeout is bypassed."""

    extremes_window_s: Annotated[float, Field(ge=1)] = 15.0
    """Sliding window of the exact min/max gauges; keep it above the Prometheus scrape interval.
    At least 1 s: the window moves in one-second slots (1.5 counts as 2)."""

    log_level: Annotated[str, _Upper] = "INFO"
    """Level of the JSON log lines written to stderr."""

    otlp_endpoint: Annotated[str | None, _env("OTEL_EXPORTER_OTLP_ENDPOINT")] = None
    """`OTEL_EXPORTER_OTLP_ENDPOINT`: the collector's base URL (`/v1/traces` is added for HTTP)."""
    otlp_traces_endpoint: Annotated[str | None, _env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")] = None
    """`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`: the full traces URL, used as is; wins over the base URL."""
    otlp_protocol: Annotated[
        Literal["grpc", "http/protobuf"],
        _Lower,
        _env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ] = "http/protobuf"
    """`OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` or `OTEL_EXPORTER_OTLP_PROTOCOL`."""
    traces_exporter: Annotated[Literal["otlp", "console", "none"], _Lower, _env("OTEL_TRACES_EXPORTER")] = (
        "otlp"
    )
    """`OTEL_TRACES_EXPORTER`: `otlp` (once an endpoint is set), `console` (stdout) or `none`."""
    trace_text: bool = False
    """`CLIPLENS_TRACE_TEXT=1`: span events carry each text itself (else only its length and a hash)."""

    @property
    def buckets(self) -> frozenset[str]:
        """Every bucket a reference may name."""
        names = set(self.allowed_buckets)
        if self.default_bucket:
            names.add(self.default_bucket)
        return frozenset(names)


_PARSER = TypeAdapter(Settings)


def load_settings(
    environ: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None
) -> Settings:
    """Build Settings from `environ` (the process environment by default), with `overrides`
    ({variable: value}, what `cliplens serve --flag value` says) winning over it.

    Raises SettingsError, one line naming every unusable variable and its value, and when
    `STORAGE_EMULATOR_HOST` is set without `CLIPLENS_ALLOW_EMULATOR=1`: gcloud-aio would then
    silently drop authentication and TLS verification, which must never happen by accident in
    production.
    """
    env = os.environ if environ is None else environ
    present = {name: value.strip() for name, value in {**env, **(overrides or {})}.items() if value.strip()}
    try:
        settings = _PARSER.validate_python(present)
    except ValidationError as exc:
        problems = [
            f"{error['loc'][0]}={error['input']!r}: {error['msg'][:1].lower()}{error['msg'][1:]}"
            for error in exc.errors(include_url=False)
        ]
        raise SettingsError("; ".join(problems)) from None
    if settings.gcs_emulator_host and not settings.allow_emulator:
        raise SettingsError(
            "STORAGE_EMULATOR_HOST is set, which turns off GCS authentication and TLS verification; "
            "set CLIPLENS_ALLOW_EMULATOR=1 if this is a development setup"
        )
    return settings


@dataclass(frozen=True, slots=True)
class SettingHelp:
    """One setting as a user sees it: its variable, its flag, its default and one line of meaning."""

    field: str
    variables: tuple[str, ...]
    """Read from these, the first one set winning."""
    default: str
    meaning: str
    boolean: bool = False
    """Takes 1/0 (true/false, yes/no, on/off)."""

    @property
    def variable(self) -> str:
        """The variable that wins (the one a flag stands for)."""
        return self.variables[0]

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


def _variables(hints: Mapping[str, Any], name: str) -> tuple[str, ...]:
    """The environment variables a field is read from, the first one winning."""
    for extra in getattr(hints[name], "__metadata__", ()):
        alias = getattr(extra, "validation_alias", None)
        if isinstance(alias, AliasChoices):
            return tuple(str(choice) for choice in alias.choices)
    return (f"CLIPLENS_{name.upper()}",)


def _shown(value: object) -> str:
    """A default as the variable would spell it."""
    if value is None or value == () or value == {}:
        return "unset"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple):
        return ",".join(str(part) for part in value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


@functools.cache
def describe_settings() -> tuple[SettingHelp, ...]:
    """Every setting, in declaration order, with the first sentence-line of its docstring: one
    source for `cliplens serve --help`, its flags and the README's table (a test holds them equal)."""
    import ast
    import dataclasses
    import inspect
    import typing

    hints = typing.get_type_hints(Settings, include_extras=True)
    body = ast.parse(inspect.getsource(Settings)).body[0]
    assert isinstance(body, ast.ClassDef)
    meanings: dict[str, str] = {}
    for statement, following in zip(body.body, body.body[1:], strict=False):
        if (
            isinstance(statement, ast.AnnAssign)
            and isinstance(statement.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            meanings[statement.target.id] = " ".join(following.value.value.split())
    described = []
    for item in dataclasses.fields(Settings):
        default: object = item.default
        if default is dataclasses.MISSING and item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        if item.name == "api_tokens":
            default = ()  # never show a secret, even a default one
        boolean = typing.get_origin(hints[item.name]) is None and hints[item.name] is bool
        described.append(
            SettingHelp(
                item.name, _variables(hints, item.name), _shown(default), meanings.get(item.name, ""), boolean
            )
        )
    return tuple(described)
