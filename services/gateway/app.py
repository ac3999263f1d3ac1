"""The gateway's FastAPI app: its lifespan (upstream clients and the GatewayState), the thin
OpenAI routes, API-key and request-id middleware, OpenAI-shaped errors and the OpenAPI document.

Request bodies are read by http_helpers.parse_body (not by FastAPI's body parameters), so their
pydantic schemas are added to the OpenAPI document by hand, and /docs still shows them.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.errors import ChatfleetError
from services.common.limits import REQUEST_ID_PATTERN
from services.common.request_id import bound_request_id
from services.gateway.clients import ControllerClient, WorkerPool
from services.gateway.config import GatewayConfig
from services.gateway.errors import (
    APIError,
    error_response,
    from_chatfleet_error,
    from_rpc_error,
    from_validation_errors,
    invalid_api_key,
)
from services.gateway.fastchat_routes import create_router as fastchat_router
from services.gateway.http_helpers import (
    GatewayState,
    RouteTimeouts,
    gateway_state,
    json_response,
    parse_body,
    request_context,
    respond,
)
from services.gateway.metrics import METRICS_PATH, MeteredUpstream, install_metrics
from services.gateway.protocol import (
    REQUEST_FIELD_NAMES,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ErrorResponse,
    HealthStatus,
    ModelCard,
    ModelList,
)
from services.gateway.responses import ResponsesServing
from services.gateway.responses_protocol import (
    RESPONSES_FIELD_NAMES,
    ResponseObject,
    ResponsesRequest,
)
from services.gateway.serving_chat import ChatServing
from services.gateway.serving_completions import CompletionServing
from services.gateway.serving_embeddings import EmbeddingServing
from services.gateway.serving_models import ModelServing
from services.gateway.webui import PUBLIC_PATHS as WEBUI_PUBLIC_PATHS
from services.gateway.webui import install_webui

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
# Routes reachable without an API key (load balancers and probes; the web page, which asks for one).
# /metrics too: Prometheus scrapers usually send no key, and it carries counts, never content.
OPEN_PATHS = frozenset({"/health", METRICS_PATH, *WEBUI_PUBLIC_PATHS})


# --- middleware --------------------------------------------------------------------------------


class RequestIdMiddleware:
    """Takes `x-request-id` from the request (or makes one), keeps it in `request.state.request_id`
    and returns it as a response header, on errors too."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"x-request-id")
        # A client's request id is reused only when it is safe to log and to send as gRPC metadata.
        request_id = given if given and REQUEST_ID_PATTERN.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        # Every log line written while handling the request carries its id.
        with bound_request_id(request_id):
            await self.app(scope, receive, send_with_id)


class ApiKeyMiddleware:
    """When keys are configured, every route but /health needs `Authorization: Bearer <key>`."""

    def __init__(self, app: ASGIApp, api_keys: Sequence[str]) -> None:
        self.app = app
        self._keys = [key.encode() for key in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self._keys or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if not self._accepts(_header(scope, b"authorization")):
            response = error_response(invalid_api_key(), {"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _accepts(self, authorization: str | None) -> bool:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode("latin-1")
        # Compare with every key, constant-time, so timing tells nothing about any of them.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(given, key)
        return matched


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


# --- routes ------------------------------------------------------------------------------------


async def health(request: Request) -> JSONResponse:
    if await gateway_state(request.app).models.health():
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "unavailable"}, status_code=503)


async def list_models(request: Request) -> Response:
    models = gateway_state(request.app).models
    return json_response(await models.list_models(request_context(request)))


async def retrieve_model(request: Request, model: str) -> Response:
    models = gateway_state(request.app).models
    return json_response(await models.retrieve_model(model, request_context(request)))


async def chat_completions(request: Request) -> Response:
    body = await parse_body(request, ChatCompletionRequest)
    chat = gateway_state(request.app).chat
    return await respond(request, chat.create_chat_completion(body, request_context(request)))


async def completions(request: Request) -> Response:
    body = await parse_body(request, CompletionRequest)
    handler = gateway_state(request.app).completions
    return await respond(request, handler.create_completion(body, request_context(request)))


async def embeddings(request: Request) -> Response:
    body = await parse_body(request, EmbeddingRequest)
    handler = gateway_state(request.app).embeddings
    return await respond(request, handler.create_embedding(body, request_context(request)))


async def responses(request: Request) -> Response:
    body = await parse_body(request, ResponsesRequest, RESPONSES_FIELD_NAMES)
    handler = gateway_state(request.app).responses
    return await respond(request, handler.create_response(body, request_context(request)))


# --- error handlers ----------------------------------------------------------------------------


async def _on_api_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, APIError)
    return error_response(error)


async def _on_chatfleet_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, ChatfleetError)
    return error_response(from_chatfleet_error(error))


async def _on_rpc_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, grpc.aio.AioRpcError)
    return error_response(from_rpc_error(error))


async def _on_validation_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, RequestValidationError)
    return error_response(from_validation_errors(error.errors(), REQUEST_FIELD_NAMES))


async def _on_http_error(request: Request, error: Exception) -> Response:
    assert isinstance(error, StarletteHTTPException)
    kind = "invalid_request_error" if error.status_code < 500 else "server_error"
    api_error = APIError(error.status_code, str(error.detail), kind)
    return error_response(api_error, error.headers)


async def _on_unexpected_error(request: Request, error: Exception) -> Response:
    logger.exception("request %s failed", getattr(request.state, "request_id", "?"))
    return error_response(APIError(500, "Internal server error.", "server_error"))


_ERROR_HANDLERS: dict[type[Exception], Callable[[Request, Exception], Awaitable[Response]]] = {
    APIError: _on_api_error,
    ChatfleetError: _on_chatfleet_error,
    grpc.aio.AioRpcError: _on_rpc_error,
    RequestValidationError: _on_validation_error,
    StarletteHTTPException: _on_http_error,
    Exception: _on_unexpected_error,
}


# --- OpenAPI -------------------------------------------------------------------------------------

_ERROR_STATUSES = {
    400: "Invalid request: `error.param` names the offending field",
    401: "Missing or wrong API key (when the gateway requires one)",
    404: "Unknown model",
    413: "Request body over the gateway's --max-body-bytes",
    429: "Every worker of the model is busy: retry after `Retry-After` seconds",
    503: "No worker can serve the model right now",
    504: "The request took longer than the gateway's --request-timeout",
}


def _error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {
        status: {"model": ErrorResponse, "description": _ERROR_STATUSES[status]}
        for status in statuses
    }


def _request_body(model: type[BaseModel], *, streams: bool) -> dict[str, Any]:
    """`openapi_extra` of a route whose body `parse_body` reads as `model`; and, when it `streams`,
    the server-sent events that answer `"stream": true`."""
    extra: dict[str, Any] = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
            },
        }
    }
    if streams:
        # Before OpenAPI 3.2's `itemSchema`, the schema of an event stream is that of one event.
        event = {
            "type": "object",
            "required": ["data"],
            "properties": {
                "data": {
                    "type": "string",
                    "description": "a JSON chunk, a JSON error object, or `[DONE]` (the last)",
                }
            },
        }
        events = {
            "schema": event,
            "description": 'With `"stream": true`: `data: {chunk}` events, then `data: [DONE]`',
        }
        extra["responses"] = {"200": {"content": {"text/event-stream": events}}}
    return extra


_REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    ResponsesRequest,
)


def _request_schemas() -> dict[str, Any]:
    """The request models' JSON schemas (and the models they nest) as OpenAPI components."""
    _, schema = models_json_schema(
        [(model, "validation") for model in _REQUEST_MODELS],
        ref_template="#/components/schemas/{model}",
    )
    defs: dict[str, Any] = schema["$defs"]
    return defs


def _openapi(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """FastAPI's OpenAPI generator, plus the request body schemas it cannot see."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            # FastAPI documents a 422 for path parameters; bad input is a 400 here (the
            # RequestValidationError handler), and a path `str` cannot fail anyway.
            for operations in schema["paths"].values():
                for operation in operations.values():
                    operation["responses"].pop("422", None)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            for name, definition in _request_schemas().items():
                # A name shared by a request and a response model would make one of them wrong.
                if components.setdefault(name, definition) != definition:
                    raise RuntimeError(f"two OpenAPI schemas are named {name}")
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


# --- the app -----------------------------------------------------------------------------------


def create_app(config: GatewayConfig) -> FastAPI:
    """The gateway app. Its lifespan opens the gRPC clients and closes them on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        upstream = MeteredUpstream(
            ControllerClient(config.controller_address, config.security),
            WorkerPool(config.security),
            worker_retries=config.worker_retries,
            select_timeout=config.select_timeout_seconds,
            max_concurrent_calls=config.max_concurrent_calls,
            metrics=app.state.metrics,
        )
        timeouts = RouteTimeouts.from_config(config)
        GatewayState(
            config=config,
            upstream=upstream,
            models=ModelServing(upstream),
            chat=ChatServing(upstream, timeouts),
            completions=CompletionServing(upstream, timeouts),
            embeddings=EmbeddingServing(upstream, timeouts),
            responses=ResponsesServing(upstream, timeouts),
        ).install(app)
        logger.info("gateway uses the controller at %s", config.controller_address)
        try:
            yield
        finally:
            await upstream.close()

    app = FastAPI(title="chatfleet gateway", version="0.1.0", lifespan=lifespan)
    upstream_errors = (429, 503, 504)
    app.add_api_route(
        "/health",
        health,
        methods=["GET"],
        response_model=HealthStatus,
        responses={503: {"model": HealthStatus, "description": "The controller is unreachable"}},
    )
    app.add_api_route(
        "/v1/models",
        list_models,
        methods=["GET"],
        response_model=ModelList,
        responses=_error_responses(401, *upstream_errors),
    )
    app.add_api_route(
        "/v1/models/{model:path}",
        retrieve_model,
        methods=["GET"],
        response_model=ModelCard,
        responses=_error_responses(401, 404, *upstream_errors),
    )
    generation: list[tuple[str, Callable[..., Awaitable[Response]], type[BaseModel], type]] = [
        ("/v1/chat/completions", chat_completions, ChatCompletionRequest, ChatCompletionResponse),
        ("/v1/completions", completions, CompletionRequest, CompletionResponse),
        ("/v1/embeddings", embeddings, EmbeddingRequest, EmbeddingResponse),
        ("/v1/responses", responses, ResponsesRequest, ResponseObject),
    ]
    for path, endpoint, body, answer in generation:
        app.add_api_route(
            path,
            endpoint,
            methods=["POST"],
            response_model=answer,
            responses=_error_responses(400, 401, 404, 413, *upstream_errors),
            openapi_extra=_request_body(body, streams=body is not EmbeddingRequest),
        )
    app.include_router(fastchat_router())
    install_webui(app)
    app.openapi = _openapi(app)  # type: ignore[method-assign]
    handlers: dict[Any, Any] = dict(_ERROR_HANDLERS)
    for exc_class, handler in handlers.items():
        app.add_exception_handler(exc_class, handler)
    # The last added middleware runs first: request ids are assigned before keys are checked, so a
    # 401 carries one too.
    app.add_middleware(ApiKeyMiddleware, api_keys=config.api_keys)
    app.add_middleware(RequestIdMiddleware)
    install_metrics(app)  # /metrics, and counts every response of the middleware above
    # Outermost: answers browsers' preflight requests, which carry no API key, and adds the CORS
    # headers to every response, errors included, so a browser client can read them.
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(config.allowed_origins),
        allow_methods=list(config.allowed_methods),
        allow_headers=list(config.allowed_headers),
        allow_credentials=config.allow_credentials,
        expose_headers=[REQUEST_ID_HEADER],
    )
    return app
