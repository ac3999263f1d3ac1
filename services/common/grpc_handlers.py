"""Rewrapping a gRPC method handler's behaviour: what every server interceptor of ours that runs
code around a call (error mapping, request ids) needs."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

UnaryBehavior = Callable[..., Awaitable[Any]]
StreamBehavior = Callable[..., AsyncIterator[Any]]


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    unary: Callable[[UnaryBehavior], UnaryBehavior],
    stream: Callable[[StreamBehavior], StreamBehavior],
) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour wrapped by `unary` (coroutines) or `stream` (async
    generators). Server-streaming handlers either yield or `await context.write()` and return (like
    the stock health Watch), so each gets the wrapper of its kind. Client-streaming handlers (none
    of chatfleet's RPCs) are returned as they are."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            unary(handler.unary_unary),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        behavior = handler.unary_stream
        return grpc.unary_stream_rpc_method_handler(
            stream(behavior) if inspect.isasyncgenfunction(behavior) else unary(behavior),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler
