"""`chatfleet chat`: a terminal chat that streams replies through the gateway's OpenAI API."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
from rich.console import Console

from services.cli.main import new_parser, run

EXIT, RESET = "!!exit", "!!reset"


class ChatError(RuntimeError):
    """The gateway answered with an OpenAI error."""


async def stream_chat(
    client: httpx.AsyncClient, body: dict[str, Any], headers: dict[str, str]
) -> AsyncIterator[str]:
    """Yield content deltas of one streamed chat completion."""
    async with client.stream(
        "POST", "/v1/chat/completions", json=body, headers=headers
    ) as response:
        if response.status_code != 200:
            payload = json.loads(await response.aread())
            raise ChatError(payload.get("error", {}).get("message", response.text))
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                return
            chunk = json.loads(data)
            if "error" in chunk:
                raise ChatError(chunk["error"].get("message", "error"))
            for choice in chunk.get("choices", []):
                content = choice.get("delta", {}).get("content")
                if content:
                    yield content


async def chat(
    url: str,
    model: str,
    api_key: str | None,
    system: str | None,
    temperature: float,
    max_tokens: int,
) -> int:
    console = Console()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    console.print(f"[bold]chatfleet chat[/bold] with {model} at {url}  ({EXIT} to quit, {RESET})")
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0)) as client:
        while True:
            try:
                text = await asyncio.to_thread(input, "USER: ")
            except EOFError:
                return 0
            if not text.strip():
                continue
            if text.strip() == EXIT:
                return 0
            if text.strip() == RESET:
                history = history[:1] if system else []
                console.print("[dim]conversation reset[/dim]")
                continue
            history.append({"role": "user", "content": text})
            body = {
                "model": model,
                "messages": history,
                "stream": True,
                "temperature": temperature,
                "max_tokens": max_tokens,
            }
            console.print("ASSISTANT: ", end="")
            reply: list[str] = []
            try:
                async for piece in stream_chat(client, body, headers):
                    reply.append(piece)
                    console.out(piece, end="", highlight=False)
                console.print()
                history.append({"role": "assistant", "content": "".join(reply)})
            except (ChatError, httpx.HTTPError) as error:
                history.pop()
                console.print(f"\n[red]error:[/red] {error}")


def main(argv: list[str] | None = None) -> int:
    parser, flags = new_parser("chat", "Chat with a model in the terminal through the gateway.")
    flags.add("--url", default="http://127.0.0.1:8000", help="the gateway's base URL")
    flags.add("--model", default="SmolLM2-135M-Instruct", help="the model to chat with")
    flags.add("--api-key", default=None, help="gateway API key, if it requires one")
    flags.add("--system", default=None, help="an optional system prompt")
    flags.add("--temperature", default=0.7, type=float, help="sampling temperature")
    flags.add("--max-tokens", default=512, type=int, help="maximum tokens per reply")
    ns = parser.parse_args(argv)
    if not sys.stdin:
        return 2
    return run(chat(ns.url, ns.model, ns.api_key, ns.system, ns.temperature, ns.max_tokens))
