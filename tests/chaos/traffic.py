"""OpenAI-style chat requests against the gateway that report how each one ended, for the chaos
suite and `make soak`: a status, an error kind, the text, and whether a stream ended with [DONE]."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from tests.chaos.fleet import CHAT_MODEL


@dataclass
class Outcome:
    """How one request ended.

    kind: "ok" (complete answer), "http_<status>" (refused before any output), "stream_error"
    (an SSE error event then [DONE]), "disconnected" (the client hung up on purpose),
    "no_done" (a stream that ended without [DONE]: never acceptable), "transport" (the HTTP
    connection failed).
    """

    kind: str
    status: int = 0
    content: str = ""
    finish_reason: str | None = None
    error: dict[str, Any] | None = None
    retry_after: str | None = None
    # Loop time at which the stream's error event arrived.
    error_at: float | None = None

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


def chat_body(prompt: str, *, max_tokens: int, stream: bool) -> dict[str, Any]:
    return {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        # A fixed length whatever the model says: streams last long enough to be interrupted.
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }


async def chat(
    client: httpx.AsyncClient,
    prompt: str,
    *,
    max_tokens: int,
    stream: bool,
    started: asyncio.Event | None = None,
    on_piece: Callable[[], None] | None = None,
    hang_up_after: int | None = None,
) -> Outcome:
    """One chat completion. Streams: `started` is set once the first piece of text arrives,
    `on_piece` is called for each; `hang_up_after`: close the connection after that many."""
    body = chat_body(prompt, max_tokens=max_tokens, stream=stream)
    try:
        if not stream:
            response = await client.post("/v1/chat/completions", json=body)
            return _plain(response)
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return _plain(response)
            return await _events(response, started, on_piece, hang_up_after)
    except httpx.TransportError as error:
        return Outcome(kind="transport", error={"message": repr(error)})


def _plain(response: httpx.Response) -> Outcome:
    if response.status_code != 200:
        try:
            error = response.json().get("error")
        except ValueError:
            error = {"message": response.text[:200]}
        return Outcome(
            kind=f"http_{response.status_code}",
            status=response.status_code,
            error=error,
            retry_after=response.headers.get("retry-after"),
        )
    choice = response.json()["choices"][0]
    return Outcome(
        kind="ok",
        status=200,
        content=choice["message"]["content"] or "",
        finish_reason=choice["finish_reason"],
    )


async def _events(
    response: httpx.Response,
    started: asyncio.Event | None,
    on_piece: Callable[[], None] | None,
    hang_up_after: int | None,
) -> Outcome:
    outcome = Outcome(kind="no_done", status=200)
    pieces = 0
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            if outcome.error is None and outcome.finish_reason is not None:
                outcome.kind = "ok"
            elif outcome.error is not None:
                outcome.kind = "stream_error"
            return outcome
        event = json.loads(data)
        if "error" in event:
            outcome.error = event["error"]
            outcome.error_at = asyncio.get_running_loop().time()
            continue
        for choice in event.get("choices", ()):
            text = (choice.get("delta") or {}).get("content")
            if text:
                outcome.content += text
                pieces += 1
                if started is not None:
                    started.set()
                if on_piece is not None:
                    on_piece()
            if choice.get("finish_reason"):
                outcome.finish_reason = choice["finish_reason"]
        if hang_up_after is not None and pieces >= hang_up_after:
            outcome.kind = "disconnected"
            return outcome  # leaving the block closes the connection
    return outcome
