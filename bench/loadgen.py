"""The load generator: a closed-loop pool of streaming /v1/completions clients that times every
content chunk as it arrives."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from bench.metrics import RequestResult

# A stream may sit in the worker's queue for a long time at high concurrency on a slow engine:
# only connecting is bounded tightly.
_TIMEOUT = httpx.Timeout(connect=10.0, read=900.0, write=30.0, pool=None)


@dataclass(frozen=True)
class LoadSpec:
    """What every request of a run asks for."""

    gateway_url: str
    model: str
    prompts: tuple[str, ...]
    max_tokens: int
    api_key: str | None = None

    def payload(self, prompt_index: int, max_tokens: int | None = None) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt": self.prompts[prompt_index],
            "max_tokens": max_tokens or self.max_tokens,
            "temperature": 0.0,
            # A fixed output length: every request decodes exactly max_tokens tokens.
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }


def new_client(spec: LoadSpec, connections: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else None
    return httpx.AsyncClient(
        base_url=spec.gateway_url.rstrip("/"),
        headers=headers,
        timeout=_TIMEOUT,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


async def stream_completion(
    client: httpx.AsyncClient, spec: LoadSpec, prompt_index: int, max_tokens: int | None = None
) -> RequestResult:
    """Send one streaming completion and record when each content chunk arrived. Anything but a
    complete stream of exactly max_tokens tokens is an error."""
    expected = max_tokens or spec.max_tokens
    result = RequestResult(prompt_index=prompt_index, start=time.perf_counter())
    usage: dict[str, Any] | None = None
    try:
        async with client.stream(
            "POST", "/v1/completions", json=spec.payload(prompt_index, expected)
        ) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:200]}"
                return result
            async for line in response.aiter_lines():
                # Read the clock before parsing, so JSON decoding is not counted as latency.
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    error = event["error"]
                    message = error.get("message") if isinstance(error, dict) else error
                    result.error = f"stream error: {message}"
                    break
                if any(choice.get("text") for choice in event.get("choices") or ()):
                    result.token_arrivals.append(now)
                if event.get("usage"):
                    usage = event["usage"]
        result.end = time.perf_counter()
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    if result.error:
        return result
    if usage is None:
        result.error = "no usage in the final chunk"
    elif not result.token_arrivals:
        result.error = "no content chunk"
    else:
        result.prompt_tokens = int(usage.get("prompt_tokens", 0))
        result.output_tokens = int(usage.get("completion_tokens", 0))
        if result.output_tokens != expected:
            result.error = f"{result.output_tokens} completion tokens instead of {expected}"
    return result


async def run_level(
    spec: LoadSpec, concurrency: int, requests: int
) -> tuple[list[RequestResult], float]:
    """Closed loop: each of `concurrency` clients sends its next request as soon as its previous
    one finished, until `requests` were sent. Request i uses prompt i modulo the set's size.
    Returns the results and the level's wall time."""
    pending: Iterator[int] = iter(range(requests))
    results: list[RequestResult] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        # One iterator shared by every client: next() hands out each index exactly once.
        for index in pending:
            results.append(await stream_completion(client, spec, index % len(spec.prompts)))

    async with new_client(spec, concurrency) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        duration = time.perf_counter() - started
    return results, duration


async def warm_up(spec: LoadSpec, prompt_indices: Sequence[int], max_tokens: int) -> None:
    """A few short requests before measuring (first-call costs, and a check that serving works);
    raises RuntimeError when one fails."""
    async with new_client(spec, 1) as client:
        for index in prompt_indices:
            result = await stream_completion(client, spec, index, max_tokens)
            if not result.ok:
                raise RuntimeError(f"warm-up request failed: {result.error}")
