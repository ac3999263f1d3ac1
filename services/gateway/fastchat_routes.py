"""FastChat's routes beyond the OpenAI API: POST /api/v1/token_check, /api/v1/chat/completions and
/v1/engines/{model}/embeddings, answered by the OpenAI routes' own handlers (serving_chat.py,
serving_embeddings.py) and the upstream clients (token counts).

They read bodies, build request contexts and respond with the same helpers as every route
(http_helpers.py), so they share its body limit, deadlines, error mapping and cancellation on
client disconnect; the app's API-key and CORS middleware cover them as they cover every route.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from chatfleet.v1 import worker_pb2
from services.gateway.clients import Upstream
from services.gateway.http_helpers import (
    RequestContext,
    gateway_state,
    parse_body,
    request_context,
    respond,
)
from services.gateway.protocol import (
    ChatCompletionResponse,
    EmbeddingResponse,
    EngineEmbeddingRequest,
    FastChatChatCompletionRequest,
    TokenCheckRequest,
    TokenCheckResponse,
    TokenCheckResult,
)

logger = logging.getLogger(__name__)


async def token_check(request: Request) -> Response:
    body = await parse_body(request, TokenCheckRequest)
    upstream = gateway_state(request.app).upstream
    return await respond(request, check_tokens(upstream, body, request_context(request)))


async def chat_completions(request: Request) -> Response:
    # The same as /v1/chat/completions, repetition_penalty included; `messages` may be a string.
    body = await parse_body(request, FastChatChatCompletionRequest)
    chat = gateway_state(request.app).chat
    return await respond(request, chat.create_chat_completion(body, request_context(request)))


async def engine_embeddings(request: Request, model: str) -> Response:
    body = await parse_body(request, EngineEmbeddingRequest)
    if not body.model:  # as in FastChat, a model named in the body wins over the path's
        body = body.model_copy(update={"model": model})
    handler = gateway_state(request.app).embeddings
    return await respond(request, handler.create_embedding(body, request_context(request)))


def create_router() -> APIRouter:
    """FastChat's extra routes."""
    router = APIRouter()
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


def _body_schema(component: str) -> dict[str, Any]:
    """OpenAPI request body: one of the schemas the app documents for its OpenAI routes."""
    ref = {"$ref": f"#/components/schemas/{component}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}
