"""The id of the request being handled, for logs: set at the gateway's HTTP edge, carried to the
controller and workers as `x-request-id` gRPC metadata, and stamped on every log record.

A ContextVar holds it: each HTTP request and each gRPC call runs in its own asyncio task, which
sees its own value (tasks it starts inherit it), so this module-level variable shares nothing
between requests. Threads do not inherit it: the worker's engine thread names the request in the
record itself (`logger.info(..., extra={"request_id": ...})`), which the filter leaves alone.

Free of grpc, so that the engine's child processes can use it without loading grpc; the gRPC
servers' interceptor that binds the metadata's id is in services.common.grpc_request_id.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from services.common.limits import REQUEST_ID_PATTERN

REQUEST_ID_METADATA_KEY = "x-request-id"

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


def bind_request_id(request_id: str | None) -> None:
    """Make `request_id` current for the rest of the running task (and the tasks it starts), for
    code that cannot hold `bound_request_id` open: an async generator may be finished from
    another context, where resetting the variable would fail."""
    _REQUEST_ID.set(request_id)


def valid_request_id(value: str | None) -> str | None:
    """`value` when it is an acceptable request id, else None."""
    if value and REQUEST_ID_PATTERN.fullmatch(value):
        return value
    return None


class RequestIdLogFilter(logging.Filter):
    """Gives every record a `request_id` attribute: the one passed in `extra`, else the current
    request's, else None. Attached to the handler, so it sees the records of every logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = _REQUEST_ID.get()
        return True
