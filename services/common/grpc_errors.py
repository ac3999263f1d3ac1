"""The one mapping from chatfleet's typed errors to gRPC status, applied by a server interceptor."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common.errors import (
    ChatfleetError,
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    UnavailableError,
)
from services.common.grpc_handlers import wrap_handler

logger = logging.getLogger(__name__)

_CODES: dict[type[ChatfleetError], grpc.StatusCode] = {
    InvalidRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    ModelNotFoundError: grpc.StatusCode.NOT_FOUND,
    OverloadedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
}


def status_code_for(error: ChatfleetError) -> grpc.StatusCode:
    """The gRPC status code of a typed error."""
    for cls in type(error).__mro__:
        if cls in _CODES:
            return _CODES[cls]
    return grpc.StatusCode.INTERNAL


def to_rpc_status(error: ChatfleetError) -> grpc.Status:
    """A rich status: code, message and, when a field is at fault, a google.rpc.BadRequest."""
    code = status_code_for(error)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=error.message)
    if error.param:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=error.param, description=error.message
                )
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad_request)
        status.details.append(detail)
    return rpc_status.to_status(status)


def field_of(error: grpc.aio.AioRpcError | grpc.RpcError) -> str | None:
    """The field named by a BadRequest detail of a failed call, if any."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            for violation in bad_request.field_violations:
                return violation.field
    return None


async def _abort(context: grpc.aio.ServicerContext, error: ChatfleetError) -> None:
    await context.abort_with_status(to_rpc_status(error))


def _wrap_unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except ChatfleetError as error:
            await _abort(context, error)

    return wrapped


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except ChatfleetError as error:
            await _abort(context, error)

    return wrapped


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns ChatfleetError raised by any handler into the matching gRPC status."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return wrap_handler(handler, _wrap_unary, _wrap_stream)
