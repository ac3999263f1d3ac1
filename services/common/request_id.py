"""The id of the request being handled, for logs: set at the gateway's HTTP edge, carried to the
controller and workers as `x-request-id` gRPC metadata, and stamped on every log record.

A ContextVar holds it: each HTTP request and each gRPC call runs in its own asyncio task, which
sees its own value (tasks it starts inherit it), so this module-level variable shares nothing
between requests. Threads do not inherit it: the worker's engine thread names the request in the
record itself (`logger.info(..., extra={"request_id": ...})`), which the filter leaves alone.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import grpc

from services.common.grpc_handlers import wrap_handler

REQUEST_ID_METADATA_KEY = "x-request-id"
# Ids taken from clients are kept only when short and made of characters that are safe in a log
# line, a header and gRPC metadata.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")

_REQUEST_ID: ContextVar[str | None] = ContextVar("chatfleet_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request this code runs for, None outside any request."""
    return _REQUEST_ID.get()


@contextmanager
def bound_request_id(request_id: str | None) -> Iterator[None]:
    """Make `request_id` current for the block (and for the tasks started in it)."""
    token = _REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        _REQUEST_ID.reset(token)


def valid_request_id(value: str | None) -> str | None:
    """`value` when it is an acceptable request id, else None."""
    if value and REQUEST_ID_PATTERN.fullmatch(value):
        return value
    return None


def request_id_from_metadata(metadata: Any) -> str | None:
    """The `x-request-id` of a call's invocation metadata, when present and valid."""
    for key, value in metadata or ():
        if key == REQUEST_ID_METADATA_KEY:
            text = value if isinstance(value, str) else bytes(value).decode("latin-1")
            return valid_request_id(text)
    return None


class RequestIdLogFilter(logging.Filter):
    """Gives every record a `request_id` attribute: the one passed in `extra`, else the current
    request's, else None. Attached to the handler, so it sees the records of every logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _REQUEST_ID.get()
        return True


# --- gRPC servers ----------------------------------------------------------------------------


def _bind_unary(
    behavior: Callable[..., Awaitable[Any]], request_id: str
) -> Callable[..., Awaitable[Any]]:
    async def bound(request: Any, context: grpc.aio.ServicerContext) -> Any:
        with bound_request_id(request_id):
            return await behavior(request, context)

    return bound


def _bind_stream(
    behavior: Callable[..., AsyncIterator[Any]], request_id: str
) -> Callable[..., AsyncIterator[Any]]:
    async def bound(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        # Set for the whole call: gRPC drives the generator from the call's own task.
        _REQUEST_ID.set(request_id)
        async for response in behavior(request, context):
            yield response

    return bound


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Makes a call's `x-request-id` metadata the current request id while its handler runs."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        request_id = request_id_from_metadata(handler_call_details.invocation_metadata)
        if handler is None or request_id is None:
            return handler
        return wrap_handler(
            handler,
            lambda behavior: _bind_unary(behavior, request_id),
            lambda behavior: _bind_stream(behavior, request_id),
        )
