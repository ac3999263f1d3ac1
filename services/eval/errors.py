"""The evaluation's typed errors: each message is the one line the command prints."""

from __future__ import annotations


class EvalError(Exception):
    """An evaluation that cannot go on; str() says what failed and what to do."""


class BenchDataError(EvalError):
    """MT-bench's data is missing or malformed."""


class UnknownModelError(EvalError):
    """A model asked for (--models, --baseline-model, --judge-model) that is not served."""


class EndpointUnreachableError(EvalError):
    """The gateway or the judge could not be reached (after the retries)."""


class ApiKeyRejectedError(EvalError):
    """The gateway or the judge answered 401/403."""


class EndpointStatusError(EvalError):
    """An HTTP error status from an endpoint (after the retries, for the retryable ones)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class RequestRejectedError(EndpointStatusError):
    """A 4xx that retrying will not fix (bad request, unknown model, context too long)."""
