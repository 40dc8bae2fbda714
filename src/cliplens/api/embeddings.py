"""POST /v1/embeddings and /v1/embeddings/upload: parse, check, run the pipeline, build the envelope.

With `on_error: fail` (the default) a request with a failed item is answered 422 `item_errors`
listing every failure, so that no client can pair vectors with the wrong inputs; with `partial`,
the others' vectors come back, each at its `index`, and `X-Items-Failed` says how many failed.
Vectors are unit length unless the request sets `normalize: false` (the model's raw projection;
the cache keeps raw projections, so both come from one vector).

Every response carries `Server-Timing` (one entry per stage and the total, from the same stamps as
the spans and histograms) and `X-Trace-Id` (the request's trace, to look up in Jaeger); with the
embedding cache on, `X-Cache-Hits` (how many of the vectors came from it).
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from litestar import Controller, Request, Response, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from opentelemetry import trace

from cliplens.api.errors import ItemsFailed, trace_headers
from cliplens.api.models import check_model
from cliplens.api.schemas import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EncodingFormat,
    ItemErrorBody,
    ItemTimings,
    StageTime,
    Usage,
    echo,
)
from cliplens.api.uploads import UploadOperation, read_upload
from cliplens.pipeline.references import Reference
from cliplens.pipeline.service import Embeddings, EmbeddingService
from cliplens.runtime import Runtime
from cliplens.settings import OnError, Settings
from cliplens.vocabulary import Modality, RequestError, RequestErrorCode

log = logging.getLogger(__name__)


def _encode(vector: np.ndarray, encoding_format: EncodingFormat) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    floats: list[float] = np.asarray(vector, dtype=np.float32).tolist()  # C, not a Python loop
    return floats


def _check_count(settings: Settings, count: int) -> None:
    if count == 0:
        raise RequestError(RequestErrorCode.EMPTY_INPUT, "`input` must hold at least one item")
    if count > settings.max_inputs:
        raise RequestError(
            RequestErrorCode.TOO_MANY_ITEMS,
            f"{count} items is more than the {settings.max_inputs} this service accepts per request "
            "(CLIPLENS_MAX_INPUTS)",
        )


@dataclass(frozen=True)
class Answer:
    """How a request wants its vectors back (JSON and upload routes alike)."""

    modality: Modality
    encoding_format: EncodingFormat = "float"
    normalize: bool = True
    on_error: OnError | None = None
    """Unset: the service's CLIPLENS_ON_ERROR."""
    timings: bool = False


def _vectors(vectors: list[np.ndarray], normalize: bool) -> np.ndarray:
    """The vectors, one row each, as float32: unit length unless the raw projection is asked for."""
    matrix = np.stack(vectors).astype(np.float32, copy=False)
    if normalize:
        matrix = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
    return matrix


def _respond(
    service: EmbeddingService, embeddings: Embeddings, answer: Answer
) -> Response[EmbeddingResponse]:
    """The 200 envelope, or `ItemsFailed` (422) when an item failed and the request said `fail`."""
    on_error = answer.on_error or service.settings.on_error
    results = sorted(embeddings.results, key=lambda r: r.index)
    made = [(result, result.vector) for result in results if result.vector is not None]
    vectors = _vectors([vector for _, vector in made], answer.normalize) if made else np.empty((0, 0))
    data = [
        EmbeddingData(index=result.index, embedding=_encode(vector, answer.encoding_format))
        for (result, _), vector in zip(made, vectors, strict=True)
    ]
    errors = [
        ItemErrorBody(index=r.index, input=echo(r.input), code=r.error.code.value, message=r.error.message)
        for r in results
        if r.error is not None
    ]
    tokens = sum(result.tokens for result, _ in made)
    images = len(data) if answer.modality is Modality.IMAGE else 0
    body = EmbeddingResponse(
        model=service.settings.served_model_name or service.model.id,
        data=data,
        errors=errors,
        usage=Usage(prompt_tokens=tokens, total_tokens=tokens, images=images),
    )
    if answer.modality is Modality.TEXT:
        body.truncated = [result.index for result in results if result.truncated]
    if answer.timings:
        body.timings = [
            ItemTimings(
                index=index,
                stages={
                    s: StageTime(queue_ms=round(q, 3), work_ms=round(w, 3)) for s, (q, w) in stages.items()
                },
            )
            for index, stages in sorted(embeddings.per_image.items())
        ]
    headers = {"Server-Timing": embeddings.timing.header(), **trace_headers()}
    if service.cache is not None:
        headers["X-Cache-Hits"] = str(embeddings.cache_hits)
    if on_error == "partial":
        headers["X-Items-Failed"] = str(len(errors))
    log.info(
        "embeddings served",
        extra={
            "modality": answer.modality,
            "items": len(embeddings.results),
            "failed": len(errors),
            "on_error": on_error,
            "stages_ms": {k: round(v, 1) for k, v in embeddings.timing.stages_ms.items()},
            "total_ms": round(embeddings.timing.total_ms, 1),
        },
    )
    if errors and on_error == "fail":
        raise ItemsFailed(errors, len(results), headers)
    return Response(body, headers=headers)


def _current_span() -> trace.SpanContext:
    return trace.get_current_span().get_span_context()


async def refuse_early(request: Request[Any, Any, Any]) -> None:
    """Before the body is read: 503 while loading or draining, 429 while already saturated or
    when the body's declared size does not fit in the memory budget.

    A saturated service must not read (up to CLIPLENS_MAX_BODY_BYTES of) a body it will refuse;
    the exact admission of the request's items happens in the service once its size is known.
    """
    runtime: Runtime = request.app.state.runtime
    runtime.service.check_capacity(_declared_length(request))


def _declared_length(request: Request[Any, Any, Any]) -> int:
    length = request.headers.get("content-length", "")
    return int(length) if length.isdigit() else 0


class EmbeddingsController(Controller):
    path = "/v1/embeddings"
    tags = ["embeddings"]

    @post(
        "/",
        status_code=200,
        summary="Embed images (or texts) given by reference",
        before_request=refuse_early,
    )
    async def create(
        self,
        data: JSONBody[EmbeddingRequest],
        runtime: NamedDependency[Runtime],
        request: Request[Any, Any, Any],
    ) -> Response[EmbeddingResponse]:
        """Each item is an object name, a gs:// URI or a data: URI (or a text, with modality=text)."""
        service = runtime.service
        items = [data.input] if isinstance(data.input, str) else data.input
        _check_count(runtime.settings, len(items))
        check_model(service.model, data.model, runtime.settings.served_model_name)
        if data.dimensions is not None and data.dimensions != service.model.dimension:
            # CLIP was not trained Matryoshka-style: a cut vector is not a smaller embedding of it.
            raise RequestError(
                RequestErrorCode.UNSUPPORTED_DIMENSIONS,
                f"{service.model.id} embeds in {service.model.dimension} dimensions only"
                f" (asked for {data.dimensions})",
            )
        modality = Modality(data.modality)
        body_bytes = len(await request.body())  # read already; held in the memory budget until the answer
        if modality is Modality.TEXT:
            embeddings = await service.embed_texts(
                items, _current_span(), data.truncate, body_bytes, read_cache=data.cache
            )
        else:
            embeddings = await service.embed_images(list(items), _current_span(), body_bytes, data.cache)
        answer = Answer(modality, data.encoding_format, data.normalize, data.on_error, data.timings)
        return _respond(service, embeddings, answer)

    @post(
        "/upload",
        status_code=200,
        summary="Embed uploaded image files",
        before_request=refuse_early,
        operation_class=UploadOperation,
    )
    async def upload(
        self, request: Request[Any, Any, Any], runtime: NamedDependency[Runtime]
    ) -> Response[EmbeddingResponse]:
        """multipart/form-data with one or more parts named `files`; each item's `input` is its file name."""
        service = runtime.service
        form = await read_upload(
            request.stream(),
            request.content_type,
            runtime.settings.max_image_bytes,
            request.app.multipart_form_part_limit,
        )
        _check_count(runtime.settings, len(form.files))
        check_model(service.model, form.model, runtime.settings.served_model_name)
        items: list[str | Reference] = list(form.files)
        embeddings = await service.embed_images(items, _current_span(), body_bytes=form.body_bytes)
        answer = Answer(Modality.IMAGE, form.encoding_format, on_error=form.on_error)
        return _respond(service, embeddings, answer)
