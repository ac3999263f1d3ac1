"""Typed errors raised by the cores; each protocol maps them to its own status in one place."""

from __future__ import annotations


class ChatfleetError(Exception):
    """Base class of every error chatfleet reports to a caller."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(ChatfleetError):
    """The request is malformed or asks for something impossible (INVALID_ARGUMENT / HTTP 400)."""


class ModelNotFoundError(ChatfleetError):
    """No such model is served (NOT_FOUND / HTTP 404)."""


class OverloadedError(ChatfleetError):
    """The admission queue is full; retry later (RESOURCE_EXHAUSTED / HTTP 429)."""


class UnavailableError(ChatfleetError):
    """Cannot take work now: loading, draining or no healthy worker (UNAVAILABLE / HTTP 503)."""
