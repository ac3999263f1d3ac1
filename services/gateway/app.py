"""The gateway's FastAPI app: thin routes, API-key and request-id middleware, OpenAI-shaped errors.

Request bodies are parsed here (not by FastAPI's body parameters) so that any content type is read
as JSON, validation is strict, and malformed JSON and bad fields get the same OpenAI error shape.

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
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.errors import ChatfleetError
from services.gateway.clients import ControllerClient, Deadline, Upstream, WorkerPool
from services.gateway.config import GatewayConfig
from services.gateway.errors import (
    APIError,
    error_response,
    from_chatfleet_error,
    from_rpc_error,
    from_validation_errors,
    invalid_api_key,
)
from services.gateway.protocol import (
    REQUEST_FIELD_NAMES,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
)
from services.gateway.serving import EventStream, OpenAIServing, RequestContext

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

REQUEST_ID_HEADER = "x-request-id"
# Routes reachable without an API key (load balancers and probes).
OPEN_PATHS = frozenset({"/health"})
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


async def _parse(request: Request, model: type[M]) -> M:
    body = await request.body()
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise from_validation_errors(error.errors(include_url=False), REQUEST_FIELD_NAMES) from None


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


# --- the app -----------------------------------------------------------------------------------


def create_app(config: GatewayConfig) -> FastAPI:
    """The gateway app. Its lifespan opens the gRPC clients and closes them on shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        upstream = Upstream(
            ControllerClient(config.controller_address),
            WorkerPool(),
            worker_retries=config.worker_retries,
        )
        app.state.serving = OpenAIServing(upstream)
        logger.info("gateway uses the controller at %s", config.controller_address)
        try:
            yield
        finally:
            await upstream.close()

    app = FastAPI(title="chatfleet gateway", version="0.1.0", lifespan=lifespan)
    app.state.config = config
    routes: list[tuple[str, Callable[..., Awaitable[Response]], str]] = [
        ("/health", health, "GET"),
        ("/v1/models", list_models, "GET"),
        ("/v1/models/{model:path}", retrieve_model, "GET"),
        ("/v1/chat/completions", chat_completions, "POST"),
        ("/v1/completions", completions, "POST"),
        ("/v1/embeddings", embeddings, "POST"),
    ]
    for path, endpoint, method in routes:
        app.add_api_route(path, endpoint, methods=[method])
    handlers: dict[Any, Any] = dict(_ERROR_HANDLERS)
    for exc_class, handler in handlers.items():
        app.add_exception_handler(exc_class, handler)
    # The last added middleware runs first: request ids are assigned before keys are checked, so a
    # 401 carries one too.
    app.add_middleware(ApiKeyMiddleware, api_keys=config.api_keys)
    app.add_middleware(RequestIdMiddleware)
    return app
