"""FastChat's routes beyond the OpenAI API: POST /api/v1/token_check, /api/v1/chat/completions and
/v1/engines/{model}/embeddings, answered by the OpenAI routes' own handlers (serving.py).

The app hands in its body parser, request context and responder (`create_router`), so these routes
share its body limits, deadlines, error mapping and cancellation on client disconnect; its API-key
and CORS middleware cover them as they cover every route.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from chatfleet.v1 import worker_pb2
from services.gateway.clients import Upstream
from services.gateway.protocol import (
    ChatCompletionResponse,
    EmbeddingResponse,
    EngineEmbeddingRequest,
    FastChatChatCompletionRequest,
    TokenCheckRequest,
    TokenCheckResponse,
    TokenCheckResult,
)
from services.gateway.serving import EventStream, OpenAIServing, RequestContext

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class Parse(Protocol):
    """Reads a request body as `model` (the app's `_parse`): OpenAI errors on bad input."""

    def __call__(self, request: Request, model: type[M], /) -> Awaitable[M]: ...


ContextOf = Callable[[Request], RequestContext]
Respond = Callable[[Request, Awaitable[BaseModel | EventStream]], Awaitable[Response]]


def create_router(*, parse: Parse, context: ContextOf, respond: Respond) -> APIRouter:
    """FastChat's extra routes, built on the app's own helpers."""
    router = APIRouter()

    async def token_check(request: Request) -> Response:
        body = await parse(request, TokenCheckRequest)
        return await respond(request, check_tokens(_upstream(request), body, context(request)))

    async def chat_completions(request: Request) -> Response:
        # The same as /v1/chat/completions, repetition_penalty included; `messages` may be a string.
        body = await parse(request, FastChatChatCompletionRequest)
        return await respond(
            request, _serving(request).create_chat_completion(body, context(request))
        )

    async def engine_embeddings(request: Request, model: str) -> Response:
        body = await parse(request, EngineEmbeddingRequest)
        if not body.model:  # as in FastChat, a model named in the body wins over the path's
            body = body.model_copy(update={"model": model})
        return await respond(request, _serving(request).create_embedding(body, context(request)))

    router.add_api_route(
        "/api/v1/token_check", token_check, methods=["POST"], response_model=TokenCheckResponse
    )
    router.add_api_route(
        "/api/v1/chat/completions",
        chat_completions,
        methods=["POST"],
        response_model=ChatCompletionResponse,
        openapi_extra=_body_schema("ChatCompletionRequest"),
    )
    router.add_api_route(
        "/v1/engines/{model:path}/embeddings",
        engine_embeddings,
        methods=["POST"],
        response_model=EmbeddingResponse,
        openapi_extra=_body_schema("EmbeddingRequest"),
    )
    return router


async def check_tokens(
    upstream: Upstream, request: TokenCheckRequest, ctx: RequestContext
) -> TokenCheckResponse:
    """Count each prompt's tokens with its model's tokenizer; it fits when the count plus its
    max_tokens is within the model's context (FastChat's rule)."""
    results = []
    for item in request.prompts:
        counted = await _tokenize(upstream, item.model, item.prompt, ctx)
        results.append(
            TokenCheckResult(
                fits=counted.count + item.max_tokens <= counted.context_length,
                tokenCount=counted.count,
                contextLength=counted.context_length,
            )
        )
    return TokenCheckResponse(prompts=results)


async def _tokenize(
    upstream: Upstream, model: str, text: str, ctx: RequestContext
) -> worker_pb2.TokenizeResponse:
    return await upstream.tokenize(model, text, deadline=ctx.deadline, metadata=ctx.metadata)


def _serving(request: Request) -> OpenAIServing:
    serving: OpenAIServing = request.app.state.serving
    return serving


def _upstream(request: Request) -> Upstream:
    return _serving(request).upstream


def _body_schema(component: str) -> dict[str, Any]:
    """OpenAPI request body: one of the schemas the app documents for its OpenAI routes."""
    ref = {"$ref": f"#/components/schemas/{component}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}
