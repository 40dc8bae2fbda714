"""GET /v1/models and /v1/models/{id}: the served model, its embedding dimension, device and dtype
(OpenAI's list and model shapes, so its client's `models.list()` and `models.retrieve()` work)."""

from __future__ import annotations

from litestar import get
from litestar.di import NamedDependency

from cliplens.api.schemas import CacheCard, Int8Fidelity, ModelCard, ModelList, echo
from cliplens.pipeline.cache import EmbeddingCache
from cliplens.pipeline.model import LoadedModel
from cliplens.runtime import Runtime
from cliplens.vocabulary import RequestError, RequestErrorCode

RANDOM_WARNING = "random weights: timings are real, embeddings are meaningless"


def check_model(served: LoadedModel, asked: str | None, alias: str | None = None) -> None:
    """A request may name the model by its full id, its architecture or the served name (the
    `CLIPLENS_SERVED_MODEL_NAME` alias); anything else is 404."""
    if asked is not None and asked not in (served.id, served.architecture, alias):
        raise RequestError(
            RequestErrorCode.MODEL_NOT_FOUND,
            f"model {echo(asked)!r} is not served here; this serves {alias or served.id!r}",
        )


def model_card(model: LoadedModel, cache: EmbeddingCache | None, alias: str | None = None) -> ModelCard:
    """The card lists the served name as the id when there is one (what clients should send)."""
    return ModelCard(
        id=alias or model.id,
        model_id=model.id,
        dimension=model.dimension,
        runtime=model.runtime,
        device=str(model.device),
        dtype=model.dtype_name,
        architecture=model.architecture,
        image_size=list(model.preprocess.size),
        random_weights=model.random_weights,
        warning=RANDOM_WARNING if model.random_weights else None,
        cache=None if cache is None else cache_card(cache),
        fidelity=int8_fidelity(model),
    )


def int8_fidelity(model: LoadedModel) -> Int8Fidelity | None:
    described = model.describe()
    if "int8_cosine_min" not in described:
        return None
    return Int8Fidelity(
        quantized=str(described["quantized"]),
        cosine_min=float(described["int8_cosine_min"]),
        cosine_mean=float(described["int8_cosine_mean"]),
        photos=str(described["fidelity_photos"]),
    )


def cache_card(cache: EmbeddingCache) -> CacheCard:
    return CacheCard(
        tiers=list(cache.tiers),
        memory_bytes=cache.memory.capacity if cache.memory is not None else 0,
        shared_url=cache.shared_url,
        shared_ttl_s=cache.ttl_s,
        model_fingerprint=cache.fingerprint[:32],
    )


@get("/v1/models", tags=["models"], sync_to_thread=False)
def list_models(runtime: NamedDependency[Runtime]) -> ModelList:
    alias = runtime.settings.served_model_name
    return ModelList(data=[model_card(runtime.service.model, runtime.service.cache, alias)])


@get("/v1/models/{model_id:path}", tags=["models"], sync_to_thread=False)
def retrieve_model(model_id: str, runtime: NamedDependency[Runtime]) -> ModelCard:
    """The model's id holds a slash (`ViT-B-32/laion2b_s34b_b79k`): the whole rest of the path is it."""
    model, alias = runtime.service.model, runtime.settings.served_model_name
    check_model(model, model_id.lstrip("/"), alias)
    return model_card(model, runtime.service.cache, alias)
