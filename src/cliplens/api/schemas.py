"""Request and response bodies of the HTTP API (msgspec Structs): a public contract.

The embeddings envelope is OpenAI's, so the official `openai` client works unchanged, plus the
`modality` extension other embedding servers use, and an `errors` list for the items that failed.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from cliplens.settings import OnError

ECHO_CHARS = 256
"""The most of an item's input an error entry echoes: enough to recognise it, never the megabytes
a client may have sent (250 names of 1 MB each once made a 256 MB answer)."""


def echo(text: str) -> str:
    """`text` as echoed back to the client: capped at `ECHO_CHARS`, marked when cut."""
    if len(text) <= ECHO_CHARS:
        return text
    return f"{text[:ECHO_CHARS]}…(+{len(text) - ECHO_CHARS} characters)"


EncodingFormat = Literal["float", "base64"]
"""How vectors are returned: JSON floats, or base64 of little-endian float32 (OpenAI's choices)."""


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    """POST /v1/embeddings."""

    input: str | list[str]
    model: str | None = None
    modality: Literal["image", "text"] = "image"
    encoding_format: EncodingFormat = "float"
    dimensions: int | None = None
    user: str | None = None
    timings: bool = False
    """Extension: also return each item's per-stage queue and work milliseconds."""
    truncate: bool = False
    """Texts longer than the model's context (77 tokens for CLIP) or the service's cap
    (CLIPLENS_MAX_TEXT_CHARS) are cut to fit instead of failing with `text_too_long`; the response's
    `truncated` lists which."""
    normalize: bool = True
    """False returns the model's raw projection instead of the unit-length vector (same direction)."""
    on_error: OnError | None = None
    """When some items fail: `fail` (422 `item_errors` listing them) or `partial` (200 with the
    others, each at its `index`, and `errors`); unset, the service's CLIPLENS_ON_ERROR."""
    cache: bool = True
    """Extension: false skips the embedding cache's lookups (every vector is made, and written)."""


class EmbeddingData(msgspec.Struct, kw_only=True):
    index: int
    embedding: list[float] | str
    object: str = "embedding"


class ItemErrorBody(msgspec.Struct, kw_only=True):
    index: int
    input: str
    code: str
    message: str


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int = 0
    total_tokens: int = 0
    images: int = 0


class StageTime(msgspec.Struct, kw_only=True):
    queue_ms: float
    work_ms: float


class ItemTimings(msgspec.Struct, kw_only=True):
    index: int
    stages: dict[str, StageTime]


class EmbeddingResponse(msgspec.Struct, kw_only=True):
    model: str
    data: list[EmbeddingData]
    errors: list[ItemErrorBody]
    usage: Usage
    object: str = "list"
    timings: list[ItemTimings] | msgspec.UnsetType = msgspec.UNSET
    truncated: list[int] | msgspec.UnsetType = msgspec.UNSET
    """Texts only: the indices of the inputs that were cut to fit (`truncate: true`)."""


class CacheCard(msgspec.Struct, kw_only=True):
    """The embedding cache the model's vectors are served from (pipeline/cache.py)."""

    tiers: list[str]
    memory_bytes: int
    shared_url: str | None
    shared_ttl_s: int
    model_fingerprint: str


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    """The name to send in requests: the served name (CLIPLENS_SERVED_MODEL_NAME) or `model_id`."""
    model_id: str
    """The model's own id (architecture/pretrained tag), whatever it is served as."""
    dimension: int
    runtime: str
    """`torch` or `onnxruntime` (CLIPLENS_RUNTIME)."""
    device: str
    dtype: str
    architecture: str
    image_size: list[int]
    random_weights: bool
    object: str = "model"
    owned_by: str = "cliplens"
    warning: str | None = None
    cache: CacheCard | None = None
    """None when the service runs without a cache."""
    fidelity: Int8Fidelity | None = None
    """int8 only: how close its vectors came to float32's, measured at start."""


class Int8Fidelity(msgspec.Struct, kw_only=True):
    quantized: str
    """Which MatMuls of the image tower are int8: `matmul` (all) or `mlp`."""
    cosine_min: float
    cosine_mean: float
    photos: str
    """How many photos it was measured on, and which (generated, or from CLIPLENS_FIDELITY_DIR)."""


class ModelList(msgspec.Struct, kw_only=True):
    data: list[ModelCard]
    object: str = "list"


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    code: str | None = None
    errors: list[ItemErrorBody] | msgspec.UnsetType = msgspec.UNSET
    """With code `item_errors`: each failed item (the openai client's `exc.body["errors"]`)."""


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every request-level error: 4xx/5xx with a JSON body that names what was wrong."""

    error: ErrorDetail


class StorageCheck(msgspec.Struct, kw_only=True):
    up: bool
    detail: str


class Health(msgspec.Struct, kw_only=True):
    status: str
    detail: str | None = None


class Readiness(Health, kw_only=True):
    storage: dict[str, StorageCheck] = {}
    """Each configured source's last check (pipeline/storage_health.py); empty until the first."""
