"""What every HTTP route of the gateway shares: the app's typed state (`GatewayState`), reading a
request body (one size limit, --max-body-bytes), a request's context and time budgets, answering
with JSON or server-sent events while watching for the client leaving, and the stream plumbing
behind every streamed answer.

Request bodies are read here (not by FastAPI's body parameters) so that any content type is read
as JSON, validation is strict, and malformed JSON and bad fields get the same OpenAI error shape.

Streams are primed: the first upstream message is awaited before the HTTP response starts, so a
request that fails up front (unknown model, overload) gets a plain HTTP error; a failure after
that is sent inside the stream (an SSE `data: {"error": ...}` event then `data: [DONE]` for chat
and completions, an `error` event for the Responses API).

Deadlines (RouteTimeouts, from the gateway's flags): a non-streamed completion, a model listing and
an embeddings request each get one budget for the whole request. A stream gets a budget for its
first token and, once tokens flow, an optional total cap (none by default), so a long answer that
keeps coming is not cut by a wall clock the client never asked for. Timeouts become 504.

Streams use Starlette's StreamingResponse rather than sse-starlette: the framing is one
`data: {json}` line per event, and sse-starlette would bring a process-wide shutdown watcher that
polls and patches uvicorn's signal handling, where serve() owns shutdown itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import grpc
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from services.common.errors import ChatfleetError
from services.gateway.clients import Deadline, DeadlineExceededError, Metadata, Upstream
from services.gateway.config import GatewayConfig
from services.gateway.errors import (
    APIError,
    from_validation_errors,
    request_too_large,
    to_api_error,
    unreadable_body,
)
from services.gateway.protocol import REQUEST_FIELD_NAMES

if TYPE_CHECKING:
    from services.gateway.responses import ResponsesServing
    from services.gateway.serving_chat import ChatServing
    from services.gateway.serving_completions import CompletionServing
    from services.gateway.serving_embeddings import EmbeddingServing
    from services.gateway.serving_models import ModelServing

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

# Failures a handler reports to the client; anything else is a bug and becomes a 500.
HandledError = (APIError, ChatfleetError, grpc.aio.AioRpcError)
# The last event of a chat or completions stream.
SSE_DONE = "data: [DONE]\n\n"


# --- the app's state -----------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayState:
    """What every route of one app shares, from start-up (the app's lifespan builds it, with the
    upstream clients) to shutdown; kept on `app.state.gateway`."""

    config: GatewayConfig
    upstream: Upstream
    models: ModelServing
    chat: ChatServing
    completions: CompletionServing
    embeddings: EmbeddingServing
    responses: ResponsesServing

    def install(self, app: Starlette) -> None:
        app.state.gateway = self


def gateway_state(app: Starlette) -> GatewayState:
    """The state the app's lifespan installed (AttributeError before start-up)."""
    state: GatewayState = app.state.gateway
    return state


# --- a request's context -------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestContext:
    """What every upstream call of one HTTP request shares."""

    request_id: str
    deadline: Deadline

    @property
    def metadata(self) -> Metadata:
        return (("x-request-id", self.request_id),)


def request_context(request: Request) -> RequestContext:
    """The request's id (from RequestIdMiddleware) and its budget, --request-timeout."""
    config = gateway_state(request.app).config
    return RequestContext(
        request_id=request.state.request_id,
        deadline=Deadline(config.request_timeout_seconds),
    )


@dataclass(frozen=True)
class RouteTimeouts:
    """Seconds each kind of request may take (see the module docstring); stream=None: no cap."""

    embeddings: float = GatewayConfig.embeddings_timeout_seconds
    first_token: float = GatewayConfig.first_token_timeout_seconds
    stream: float | None = None

    @classmethod
    def from_config(cls, config: GatewayConfig) -> RouteTimeouts:
        return cls(
            embeddings=config.embeddings_timeout_seconds,
            first_token=config.first_token_timeout_seconds,
            stream=config.stream_timeout_seconds or None,
        )

    def generation(self, stream: bool | None, ctx: RequestContext) -> Deadline:
        """The gRPC deadline of a Generate call: a stream's total cap (its first token is awaited
        within `first_token` by `first_item`); anything else has the request's budget."""
        return Deadline(self.stream) if stream else ctx.deadline


# --- reading a request ---------------------------------------------------------------------------


async def read_body(request: Request, limit: int) -> bytes:
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


async def parse_body(
    request: Request,
    model: type[M],
    field_names: Iterable[str] = REQUEST_FIELD_NAMES,
    *,
    max_bytes: int | None = None,
) -> M:
    """The body as `model`; `field_names` are the field names its error paths may hold. Bodies
    over --max-body-bytes (or over a route's own smaller `max_bytes`) get 413."""
    limit = gateway_state(request.app).config.max_body_bytes
    if max_bytes is not None:
        limit = min(limit, max_bytes)
    body = await read_body(request, limit)
    unreadable = unreadable_body(body)
    if unreadable is not None:
        raise unreadable
    try:
        return model.model_validate_json(body)
    except ValidationError as error:
        raise from_validation_errors(error.errors(include_url=False), field_names) from None


# --- answering -----------------------------------------------------------------------------------


@dataclass
class EventStream:
    """The SSE lines of a streamed answer. `close` releases the upstream calls even when the
    response never started iterating `events` (the client left before the first byte)."""

    events: AsyncIterator[str]
    close: Callable[[], Awaitable[None]]


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


def json_response(model: BaseModel, status_code: int = 200) -> Response:
    # pydantic writes the body: it handles floats such as -inf logprobs that json.dumps rejects.
    return Response(model.model_dump_json(), status_code=status_code, media_type="application/json")


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def respond(request: Request, handler: Awaitable[BaseModel | EventStream]) -> Response:
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
    return json_response(result)


def sse(chunk: BaseModel, include_usage: bool) -> str:
    """One `data:` event of a chat or completions stream; `usage` only when the client asked."""
    exclude = None if include_usage else {"usage"}
    return f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"


def sse_error(error: APIError | ChatfleetError | grpc.aio.AioRpcError) -> str:
    """The event reporting a failure after a chat or completions stream started."""
    api_error = to_api_error(error)
    logger.warning("stream failed after it started: %s", api_error.message)
    return f"data: {json.dumps(api_error.body())}\n\n"


# --- stream plumbing -----------------------------------------------------------------------------


async def _next(stream: AsyncIterator[T]) -> T:
    return await stream.__anext__()


async def merge_streams(
    streams: Sequence[AsyncGenerator[T, None]],
) -> AsyncGenerator[tuple[int, T], None]:
    """Interleave several streams as their items arrive, tagging each item with its stream's index.

    The first failure ends the merge; closing it (or cancelling its reader) closes every stream,
    which cancels that stream's gRPC call.
    """
    pending = {asyncio.ensure_future(_next(stream)): i for i, stream in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                index = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(_next(streams[index]))] = index
                yield index, item
    finally:
        for task in pending:
            task.cancel()  # a no-op on the reads that completed
        for task, index in pending.items():
            if task.done():
                # A read completed but its item will never be consumed: that stream waits at a
                # `yield`, where no cancellation reaches it. Close it now rather than whenever it
                # is garbage collected.
                task.exception()  # retrieved: its failure is moot once the merge is over
                await streams[index].aclose()
        if pending:
            # The other streams are inside a read: let the cancellation unwind them, so each call
            # is cancelled before the caller goes on.
            await asyncio.wait(pending)
        for stream in streams:
            await stream.aclose()  # a no-op but for a stream whose read was cancelled unbegun


async def first_item(
    stream: AsyncGenerator[tuple[int, T], None], timeout: float
) -> tuple[int, T] | None:
    """Wait for a stream's first item (None if it has none), so that an early failure is raised
    here, before any HTTP response has started. Past `timeout` seconds the stream is closed (its
    calls cancelled) and DEADLINE_EXCEEDED (504) raised."""
    try:
        return await asyncio.wait_for(anext(stream), timeout)
    except StopAsyncIteration:
        return None
    except asyncio.TimeoutError:
        await stream.aclose()
        raise DeadlineExceededError() from None


async def chained(
    first: tuple[int, T] | None, rest: AsyncIterator[tuple[int, T]]
) -> AsyncGenerator[tuple[int, T], None]:
    """The primed first item (if any), then the rest of the stream."""
    if first is not None:
        yield first
    async for item in rest:
        yield item
