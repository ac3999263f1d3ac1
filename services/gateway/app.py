"""The gateway's FastAPI app: thin routes, API-key and request-id middleware, OpenAI-shaped errors.

Request bodies are parsed here (not by FastAPI's body parameters) so that any content type is read
as JSON, validation is strict, and malformed JSON and bad fields get the same OpenAI error shape;
their pydantic schemas are added to the OpenAPI document by hand, so /docs still shows them.

Streams use Starlette's StreamingResponse rather than sse-starlette: the framing is one
`data: {json}` line per event, and sse-starlette would bring a process-wide shutdown watcher that
polls and patches uvicorn's signal handling, where serve() owns shutdown itself.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.errors import ChatfleetError
from services.common.request_id import bound_request_id
from services.gateway.clients import ControllerClient, Deadline, WorkerPool
from services.gateway.config import GatewayConfig
from services.gateway.errors import (
    APIError,
    error_response,
    from_chatfleet_error,
    from_rpc_error,
    from_validation_errors,
    invalid_api_key,
    request_too_large,
    unreadable_body,
)
from services.gateway.fastchat_routes import create_router as fastchat_router
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
from services.gateway.serving import EventStream, OpenAIServing, RequestContext, RouteTimeouts
from services.gateway.webui import PUBLIC_PATHS as WEBUI_PUBLIC_PATHS
from services.gateway.webui import install_webui

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

REQUEST_ID_HEADER = "x-request-id"
# Routes reachable without an API key (load balancers and probes; the web page, which asks for one).
# /metrics too: Prometheus scrapers usually send no key, and it carries counts, never content.
OPEN_PATHS = frozenset({"/health", METRICS_PATH, *WEBUI_PUBLIC_PATHS})
# A client's request id is reused only when it is safe to log and to send as gRPC metadata.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


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
        request_id = given if given and _REQUEST_ID_RE.fullmatch(given) else uuid.uuid4().hex
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


# --- responses ---------------------------------------------------------------------------------


class SSEResponse(StreamingResponse):
    """Server-sent events; releases the upstream calls however the response ends."""

    media_type = "text/event-stream"

    def __init__(self, stream: EventStream) -> None:
        super().__init__(
            stream.events,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._close = stream.close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._close()


def _json(model: BaseModel) -> Response:
    # pydantic writes the body: it handles floats such as -inf logprobs that json.dumps rejects.
    return Response(model.model_dump_json(), media_type="application/json")


# --- routes ------------------------------------------------------------------------------------


def _serving(request: Request) -> OpenAIServing:
    serving: OpenAIServing = request.app.state.serving
    return serving


def _context(request: Request) -> RequestContext:
    config: GatewayConfig = request.app.state.config
    return RequestContext(
        request_id=request.state.request_id,
        deadline=Deadline(config.request_timeout_seconds),
    )


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise request_too_large(limit, int(declared))
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise request_too_large(limit)
    except ClientDisconnect:
        # Gone before sending its whole body: nobody reads the answer (499 in access logs).
        raise APIError(499, "The client closed the request.", "invalid_request_error") from None
    return bytes(body)


async def _parse(
    request: Request, model: type[M], field_names: Iterable[str] = REQUEST_FIELD_NAMES
) -> M:
    """The body as `model`; `field_names` are the field names its error paths may hold."""
    config: GatewayConfig = request.app.state.config
    body = await _read_body(request, config.max_body_bytes)
    unreadable = unreadable_body(body)
    if unreadable is not None:
        raise unreadable
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise from_validation_errors(error.errors(include_url=False), field_names) from None


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _respond(request: Request, handler: Awaitable[BaseModel | EventStream]) -> Response:
    """Run a handler, cancelling it (and so its gRPC calls) if the client goes away meanwhile."""
    work = asyncio.ensure_future(handler)
    watcher = asyncio.ensure_future(_until_disconnected(request.receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            logger.info("request %s: client disconnected, cancelled", request.state.request_id)
            await asyncio.wait({work})
    if work.cancelled():
        # Nobody is listening; the status only shows in access logs (nginx's "client closed").
        return Response(status_code=499)
    result = work.result()
    if isinstance(result, EventStream):
        return SSEResponse(result)
    return _json(result)


async def health(request: Request) -> JSONResponse:
    if await _serving(request).health():
        return JSONResponse({"status": "ok"})
    return JSONResponse({"status": "unavailable"}, status_code=503)


async def list_models(request: Request) -> Response:
    return _json(await _serving(request).list_models(_context(request)))


async def retrieve_model(request: Request, model: str) -> Response:
    return _json(await _serving(request).retrieve_model(model, _context(request)))


async def chat_completions(request: Request) -> Response:
    body = await _parse(request, ChatCompletionRequest)
    return await _respond(
        request, _serving(request).create_chat_completion(body, _context(request))
    )


async def completions(request: Request) -> Response:
    body = await _parse(request, CompletionRequest)
    return await _respond(request, _serving(request).create_completion(body, _context(request)))


async def embeddings(request: Request) -> Response:
    body = await _parse(request, EmbeddingRequest)
    return await _respond(request, _serving(request).create_embedding(body, _context(request)))


async def responses(request: Request) -> Response:
    body = await _parse(request, ResponsesRequest, RESPONSES_FIELD_NAMES)
    handler: ResponsesServing = request.app.state.responses
    return await _respond(request, handler.create_response(body, _context(request)))


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
    """`openapi_extra` of a route whose body `_parse` reads as `model`; and, when it `streams`,
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
        app.state.serving = OpenAIServing(upstream, timeouts)
        app.state.responses = ResponsesServing(upstream, timeouts)
        logger.info("gateway uses the controller at %s", config.controller_address)
        try:
            yield
        finally:
            await upstream.close()

    app = FastAPI(title="chatfleet gateway", version="0.1.0", lifespan=lifespan)
    app.state.config = config
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
    app.include_router(fastchat_router(parse=_parse, context=_context, respond=_respond))
    install_webui(app, context=_context, respond=_respond)
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
