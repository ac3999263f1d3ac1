"""An OpenAI-compatible chat endpoint (the gateway, or any judge), with retries and clear errors."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from services.common.backoff import Backoff
from services.eval.errors import (
    ApiKeyRejectedError,
    EndpointStatusError,
    EndpointUnreachableError,
    EvalError,
    RequestRejectedError,
)

logger = logging.getLogger(__name__)

Message = dict[str, str]


@dataclass(frozen=True)
class RetryPolicy:
    """429, 5xx and transport errors are retried with exponential backoff: a busy gateway or a
    rate-limited judge recovers; anything else fails at once."""

    attempts: int = 4
    backoff_s: float = 1.0

    def backoff(self) -> Backoff | None:
        """The waits of one request's retries: `backoff_s`, doubled each time (no cap: the
        attempts bound them); None for a `backoff_s` of 0, which retries at once."""
        if self.backoff_s == 0:
            return None
        return Backoff(first=self.backoff_s, cap=math.inf)


class ChatEndpoint:
    """The two calls the evaluation makes: list the models, complete a chat (not streamed)."""

    def __init__(
        self,
        role: str,
        url: str,
        api_key: str | None,
        *,
        key_hint: str = "",
        retry: RetryPolicy | None = None,
        timeout_s: float = 600.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.role = role  # "gateway" or "judge", for the messages
        self.url = url.rstrip("/")
        self._key_hint = key_hint
        self._retry = retry or RetryPolicy()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # A long answer on a busy CPU takes minutes; an endpoint that refuses connections is down.
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def list_models(self) -> list[str]:
        response = await self._request("GET", "/v1/models")
        return [str(model["id"]) for model in _json(response, self).get("data", [])]

    async def chat_capabilities(self) -> dict[str, bool] | None:
        """model -> whether it chats, from the chatfleet gateway's web UI API (the OpenAI list
        does not say); None from an endpoint that has no such API."""
        try:
            response = await self._request("GET", "/api/models")
        except RequestRejectedError:
            return None
        data = _json(response, self).get("data", [])
        return {str(model["id"]): bool(model.get("supports_chat", True)) for model in data}

    async def complete(
        self, model: str, messages: Sequence[Message], *, temperature: float, max_tokens: int
    ) -> str:
        body = {
            "model": model,
            "messages": list(messages),
            "temperature": temperature,
            "max_tokens": max_tokens,
        }
        response = await self._request("POST", "/v1/chat/completions", json=body)
        try:
            message = _json(response, self)["choices"][0]["message"]
        except (KeyError, IndexError, TypeError) as error:
            raise EvalError(f"the {self.role} at {self.url} sent a reply with no choice") from error
        return str(message.get("content") or "")

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        where = f"{self.url}{path}"
        backoff = self._retry.backoff()
        failure: EvalError | None = None
        for attempt in range(self._retry.attempts):
            try:
                response = await self._http.request(method, path, **kwargs)
            except httpx.TransportError as error:
                failure = EndpointUnreachableError(
                    f"cannot reach the {self.role} at {where}: {_describe(error)} "
                    f"(after {attempt + 1} attempts)"
                )
            else:
                if response.status_code < 400:
                    return response
                failure = self._status_error(response, where)
                if not _retryable(response.status_code):
                    raise failure
            if attempt + 1 < self._retry.attempts:
                delay = backoff.step() if backoff is not None else 0.0
                logger.info("%s: %s; retrying in %.1f s", self.role, failure, delay)
                await asyncio.sleep(delay)
        assert failure is not None
        raise failure

    def _status_error(self, response: httpx.Response, where: str) -> EvalError:
        status = response.status_code
        message = _error_message(response)
        if status in (401, 403):
            hint = f": {self._key_hint}" if self._key_hint else ""
            return ApiKeyRejectedError(
                f"the {self.role} rejected the API key ({status}) at {where}{hint} ({message})"
            )
        text = f"the {self.role} at {where} answered HTTP {status}: {message}"
        if _retryable(status):
            return EndpointStatusError(text, status)
        return RequestRejectedError(text, status)


def _retryable(status: int) -> bool:
    return status == 429 or status >= 500


def _describe(error: httpx.TransportError) -> str:
    text = str(error) or "no detail"
    return f"{type(error).__name__} ({text})"


def _error_message(response: httpx.Response) -> str:
    """OpenAI's error body's message, else the start of the body."""
    try:
        payload = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text[:200] or response.reason_phrase
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error or payload)[:200]


def _json(response: httpx.Response, endpoint: ChatEndpoint) -> dict[str, Any]:
    try:
        payload = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EvalError(
            f"the {endpoint.role} at {endpoint.url} did not answer JSON: {response.text[:120]!r}"
        ) from error
    if not isinstance(payload, dict):
        raise EvalError(f"the {endpoint.role} at {endpoint.url} answered {payload!r:.120}")
    return payload
