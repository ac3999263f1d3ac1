"""The load generator: a closed-loop pool of streaming clients that times every content chunk as it
arrives, on /v1/completions (the concurrency levels) or /v1/chat/completions (the structured-output
level and its unconstrained twin)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

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


@dataclass(frozen=True)
class ChatLoadSpec:
    """What every request of a chat level asks for: one user message per prompt, greedy, up to
    max_tokens (the answer may end sooner: a JSON object closes). The structured-output level and
    its unconstrained twin differ only in response_format."""

    gateway_url: str
    model: str
    prompts: tuple[str, ...]
    max_tokens: int
    response_format: Mapping[str, Any] | None = None
    api_key: str | None = None

    def payload(self, prompt_index: int) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "user", "content": self.prompts[prompt_index]}],
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.response_format is not None:
            body["response_format"] = dict(self.response_format)
        return body


def new_client(spec: LoadSpec | ChatLoadSpec, connections: int) -> httpx.AsyncClient:
    return open_client(spec.gateway_url, spec.api_key, connections)


def open_client(
    base_url: str,
    api_key: str | None,
    connections: int,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """An HTTP client for one OpenAI-compatible server (chatfleet's gateway or a peer); tests
    pass a mock transport."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return httpx.AsyncClient(
        base_url=base_url.rstrip("/"),
        transport=transport,
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
    result = await _stream(
        client,
        "/v1/completions",
        spec.payload(prompt_index, expected),
        RequestResult(prompt_index=prompt_index, start=time.perf_counter()),
        lambda choice: choice.get("text") or "",
    )
    if result.ok and result.output_tokens != expected:
        result.error = f"{result.output_tokens} completion tokens instead of {expected}"
    return result


async def stream_chat(
    client: httpx.AsyncClient, spec: ChatLoadSpec, prompt_index: int
) -> RequestResult:
    """Send one streaming chat completion, record when each content chunk arrived and keep the
    text (to check the structured outputs). Up to max_tokens tokens is a complete answer."""
    result = await _stream(
        client,
        "/v1/chat/completions",
        spec.payload(prompt_index),
        RequestResult(prompt_index=prompt_index, start=time.perf_counter()),
        lambda choice: (choice.get("delta") or {}).get("content") or "",
    )
    if result.ok and not 0 < result.output_tokens <= spec.max_tokens:
        result.error = f"{result.output_tokens} completion tokens, expected 1 to {spec.max_tokens}"
    return result


async def stream_messages(
    client: httpx.AsyncClient,
    model: str,
    messages: Sequence[Mapping[str, str]],
    max_tokens: int,
    prompt_index: int = 0,
) -> RequestResult:
    """Send one streaming chat completion of a whole conversation (greedy, exactly max_tokens
    tokens: ignore_eos) and keep the answer's text, to append to the history. Anything but a
    complete stream of exactly max_tokens tokens is an error."""
    payload = {
        "model": model,
        "messages": [dict(message) for message in messages],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result = await _stream(
        client,
        "/v1/chat/completions",
        payload,
        RequestResult(prompt_index=prompt_index, start=time.perf_counter()),
        lambda choice: (choice.get("delta") or {}).get("content") or "",
    )
    if result.ok and result.output_tokens != max_tokens:
        result.error = f"{result.output_tokens} completion tokens instead of {max_tokens}"
    return result


async def _stream(
    client: httpx.AsyncClient,
    path: str,
    payload: dict[str, Any],
    result: RequestResult,
    content_of: Callable[[dict[str, Any]], str],
) -> RequestResult:
    """POST a streaming request and read its server-sent events into `result`: the arrival of
    every chunk with content, the text, and the final usage."""
    usage: dict[str, Any] | None = None
    pieces: list[str] = []
    try:
        async with client.stream("POST", path, json=payload) as response:
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
                contents = [content_of(choice) for choice in event.get("choices") or ()]
                if any(contents):
                    result.token_arrivals.append(now)
                    pieces.extend(contents)
                if event.get("usage"):
                    usage = event["usage"]
        result.end = time.perf_counter()
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.text = "".join(pieces)
    if result.error:
        return result
    if usage is None:
        result.error = "no usage in the final chunk"
    elif not result.token_arrivals:
        result.error = "no content chunk"
    else:
        result.prompt_tokens = int(usage.get("prompt_tokens", 0))
        result.output_tokens = int(usage.get("completion_tokens", 0))
        details = usage.get("prompt_tokens_details") or {}
        result.cached_tokens = int(details.get("cached_tokens") or 0)
    return result


async def run_level(
    spec: LoadSpec | ChatLoadSpec, concurrency: int, requests: int
) -> tuple[list[RequestResult], float]:
    """Closed loop: each of `concurrency` clients sends its next request as soon as its previous
    one finished, until `requests` were sent. Request i uses prompt i modulo the set's size.
    Returns the results and the level's wall time."""
    pending: Iterator[int] = iter(range(requests))
    results: list[RequestResult] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        # One iterator shared by every client: next() hands out each index exactly once.
        for index in pending:
            prompt = index % len(spec.prompts)
            if isinstance(spec, ChatLoadSpec):
                results.append(await stream_chat(client, spec, prompt))
            else:
                results.append(await stream_completion(client, spec, prompt))

    async with new_client(spec, concurrency) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        duration = time.perf_counter() - started
    return results, duration


async def warm_up(
    spec: LoadSpec | ChatLoadSpec, prompt_indices: Sequence[int], max_tokens: int
) -> None:
    """A few short requests before measuring (first-call costs such as compiling a schema, and a
    check that serving works); raises RuntimeError when one fails."""
    async with new_client(spec, 1) as client:
        for index in prompt_indices:
            if isinstance(spec, ChatLoadSpec):
                result = await stream_chat(client, spec, index)
            else:
                result = await stream_completion(client, spec, index, max_tokens)
            if not result.ok:
                raise RuntimeError(f"warm-up request failed: {result.error}")


async def scrape_counters(metrics_url: str, names: Sequence[str]) -> dict[str, float]:
    """The named samples of a Prometheus /metrics page, each summed over its labels (one sample
    per model); a name the page lacks is absent. Raises httpx.HTTPError when the page can't be
    read."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as client:
        response = await client.get(metrics_url)
        response.raise_for_status()
    return parse_counters(response.text, names)


def parse_counters(exposition: str, names: Sequence[str]) -> dict[str, float]:
    """The named samples of a Prometheus text exposition, each summed over its labels."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name in names:
                totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals
