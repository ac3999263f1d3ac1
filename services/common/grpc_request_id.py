"""Request ids on chatfleet's gRPC servers: an interceptor that makes a call's `x-request-id`
metadata the current request id (services.common.request_id) while its handler runs."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from services.common.grpc_handlers import wrap_handler
from services.common.request_id import (
    REQUEST_ID_METADATA_KEY,
    bind_request_id,
    bound_request_id,
    valid_request_id,
)


def request_id_from_metadata(metadata: Any) -> str | None:
    """The `x-request-id` of a call's invocation metadata, when present and valid."""
    for key, value in metadata or ():
        if key == REQUEST_ID_METADATA_KEY:
            text = value if isinstance(value, str) else bytes(value).decode("latin-1")
            return valid_request_id(text)
    return None


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
        bind_request_id(request_id)
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
