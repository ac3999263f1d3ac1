"""The one mapping from failures (gRPC status, typed errors, bad request bodies) to OpenAI errors.

Every error the gateway returns has OpenAI's body `{"error": {"message", "type", "param", "code"}}`
and the matching HTTP status.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from fastapi.responses import JSONResponse

from services.common.errors import ChatfleetError
from services.common.grpc_errors import field_of, status_code_for

logger = logging.getLogger(__name__)

# Seconds a client should wait before retrying an overloaded request (no worker sends a hint yet).
RETRY_AFTER_SECONDS = 1


@dataclass
class APIError(Exception):
    """An error ready to be sent to an OpenAI client."""

    status_code: int
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# gRPC status -> (HTTP status, OpenAI error type, OpenAI error code). Anything else is a 500.
_BY_STATUS: dict[grpc.StatusCode, tuple[int, str, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error", "service_unavailable"),
    # A call the gateway did not cancel itself (it never answers a client that went away): the
    # server ended it, e.g. while shutting down, or refused it under a flood of cancelled calls.
    grpc.StatusCode.CANCELLED: (503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error", "timeout"),
}
_INTERNAL = (500, "server_error", None)


def error_for_status(code: grpc.StatusCode, message: str, param: str | None = None) -> APIError:
    """The OpenAI error for a gRPC status code: the one table every other helper goes through."""
    status, kind, openai_code = _BY_STATUS.get(code, _INTERNAL)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 429 else {}
    if status == 500:
        logger.error("upstream failed with %s: %s", code.name, message)
    return APIError(status, message or code.name, kind, param, openai_code, headers)


def from_rpc_error(error: grpc.aio.AioRpcError) -> APIError:
    """Map a failed gRPC call; INVALID_ARGUMENT takes `param` from its google.rpc.BadRequest."""
    code = error.code()
    param = field_of(error) if code == grpc.StatusCode.INVALID_ARGUMENT else None
    return error_for_status(code, error.details() or "", param)


def from_chatfleet_error(error: ChatfleetError) -> APIError:
    """Map an error raised inside the gateway itself (for example a field it does not support)."""
    return error_for_status(status_code_for(error), error.message, error.param)


def to_api_error(error: APIError | ChatfleetError | grpc.aio.AioRpcError) -> APIError:
    """Any of the failures a handler may raise, as an OpenAI error."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, ChatfleetError):
        return from_chatfleet_error(error)
    return from_rpc_error(error)


def invalid_api_key() -> APIError:
    return error_for_status(
        grpc.StatusCode.UNAUTHENTICATED,
        "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
    )


def request_too_large(limit: int, size: int | None = None) -> APIError:
    """413: the body is over --max-body-bytes (`size` when the client declared it up front)."""
    got = f"is {size} bytes" if size is not None else "is larger"
    return APIError(
        413,
        f"The request body {got}; the limit is {limit} bytes.",
        "invalid_request_error",
        code="request_too_large",
    )


def unreadable_body(body: bytes) -> APIError | None:
    """400 for a body that cannot be JSON at all: empty or not UTF-8. None when it may be."""
    if not body.strip():
        return APIError(
            400,
            "The request body is empty: the API expects a JSON object.",
            "invalid_request_error",
        )
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as error:
        return APIError(
            400,
            f"The request body is not valid UTF-8 (byte 0x{body[error.start]:02x} at offset "
            f"{error.start}): the API expects a JSON object encoded in UTF-8.",
            "invalid_request_error",
        )
    return None


def _path(loc: Sequence[int | str], names: set[str]) -> tuple[str, int | None]:
    """`('messages', 0, 'content', 'list[ContentPart]', 1)` -> `messages[0].content[1]`, and where
    the path entered a union member (here after `messages[0].content`), if it did.

    pydantic puts the name of the union member that failed into `loc`: only field names and list
    indexes belong in the path.
    """
    path = ""
    union_at = None
    for item in loc:
        if isinstance(item, int):
            path += f"[{item}]"
        elif item in names:
            path += f".{item}" if path else item
        elif union_at is None:
            union_at = len(path)
    return path, union_at


def from_validation_errors(
    errors: Sequence[Mapping[str, Any]], field_names: Iterable[str]
) -> APIError:
    """A pydantic validation failure of a request body, reported on its first offending field."""
    first = errors[0] if errors else {"type": "missing", "loc": (), "msg": "invalid request"}
    if first["type"] == "json_invalid":
        return APIError(
            400,
            "We could not parse the JSON body of your request: "
            f"{first['msg']}. The API expects a JSON object.",
            "invalid_request_error",
        )
    path, union_at = _path(first["loc"], set(field_names))
    param = path or None
    if union_at is not None:
        # Which member of a union the client meant is a guess: blame the union field as a whole.
        param = path[:union_at] or None
        message = f"Invalid value for '{param}': it matches none of the accepted types."
    elif param is None:
        message = f"Invalid request body: {first['msg']}."
    elif first["type"] == "missing":
        message = f"Missing required parameter: '{param}'."
    elif str(first["type"]).endswith("_type"):
        message = f"Invalid type for '{param}': {first['msg']}."
    else:
        message = f"Invalid value for '{param}': {first['msg']}."
    return APIError(400, message, "invalid_request_error", param)


def error_response(error: APIError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The HTTP response carrying an OpenAI error."""
    return JSONResponse(
        error.body(), status_code=error.status_code, headers={**error.headers, **(headers or {})}
    )
