"""The handler of POST /v1/embeddings (and FastChat's /v1/engines/{model}/embeddings): texts in,
one Embed call upstream, vectors out as float lists or base64."""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence

from chatfleet.v1 import worker_pb2
from services.common.errors import InvalidRequestError
from services.gateway.clients import Deadline, Upstream
from services.gateway.http_helpers import RequestContext, RouteTimeouts
from services.gateway.protocol import (
    CompletionPrompt,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
)


class EmbeddingServing:
    """Embeddings; one per app, within RouteTimeouts.embeddings."""

    def __init__(self, upstream: Upstream, timeouts: RouteTimeouts | None = None) -> None:
        self.upstream = upstream
        self.timeouts = timeouts or RouteTimeouts()

    async def create_embedding(
        self, request: EmbeddingRequest, ctx: RequestContext
    ) -> EmbeddingResponse:
        if request.dimensions is not None:
            raise InvalidRequestError(
                "'dimensions' is not supported: embeddings have the model's own size.",
                param="dimensions",
            )
        inputs = _embedding_inputs(request.input)
        response = await self.upstream.embed(
            worker_pb2.EmbedRequest(model=request.model, inputs=inputs, request_id=ctx.request_id),
            deadline=Deadline(self.timeouts.embeddings),
            metadata=ctx.metadata,
        )
        as_base64 = request.encoding_format == "base64"
        return EmbeddingResponse(
            data=[
                EmbeddingData(
                    index=i,
                    embedding=_base64_floats(item.values) if as_base64 else list(item.values),
                )
                for i, item in enumerate(response.embeddings)
            ],
            model=request.model,
            usage=EmbeddingUsage(
                prompt_tokens=response.prompt_tokens, total_tokens=response.prompt_tokens
            ),
        )


def _embedding_inputs(value: CompletionPrompt) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not value:
        raise InvalidRequestError("'input' must not be empty.", param="input")
    texts = [item for item in value if isinstance(item, str)]
    if len(texts) != len(value):
        raise InvalidRequestError(
            "Token id inputs are not supported for embeddings yet: send the text instead.",
            param="input",
        )
    return texts


def _base64_floats(values: Sequence[float]) -> str:
    """Little-endian float32 bytes in base64, as the OpenAI SDK decodes them."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")
