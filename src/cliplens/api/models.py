"""GET /v1/models: the served model, its embedding dimension, device and dtype (OpenAI's list shape)."""

from __future__ import annotations

from litestar import get
from litestar.di import NamedDependency

from cliplens.api.schemas import ModelCard, ModelList
from cliplens.runtime import Runtime

RANDOM_WARNING = "random weights: timings are real, embeddings are meaningless"


@get("/v1/models", tags=["models"], sync_to_thread=False)
def list_models(runtime: NamedDependency[Runtime]) -> ModelList:
    model = runtime.service.model
    card = ModelCard(
        id=model.id,
        dimension=model.dimension,
        device=str(model.device),
        dtype=model.dtype_name,
        architecture=model.architecture,
        image_size=list(model.preprocess.size),
        random_weights=model.random_weights,
        warning=RANDOM_WARNING if model.random_weights else None,
    )
    return ModelList(data=[card])
