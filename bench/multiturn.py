"""The multi-turn level: several users chat at once, each for a number of turns, and every turn
resends the whole growing conversation plus a new user message (as the web UI does). Time to first
token per turn shows whether the server prefills the shared history again (it grows with the turn)
or reuses it (prefix caching: it stays flat)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from bench.loadgen import open_client, stream_messages
from bench.metrics import RequestResult, percentile
from bench.prompts import multiturn_message

SYSTEM_PROMPT = "You are a helpful assistant. Answer in plain prose."


@dataclass(frozen=True)
class MultiTurnSpec:
    """Who is measured and how hard: `users` conversations at once, `turns` each, every answer
    exactly max_tokens tokens long."""

    base_url: str
    model: str
    users: int
    turns: int
    max_tokens: int
    api_key: str | None = None


@dataclass(frozen=True)
class TurnMetrics:
    """One turn index over every user's conversation."""

    turn: int  # 1-based
    completed: int
    errors: int
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    mean_prompt_tokens: float | None
    mean_cached_tokens: float | None  # as the server reports it (0 where it does not)


@dataclass(frozen=True)
class MultiTurnLevel:
    """The figures of one multi-turn run (one server, one setting)."""

    label: str  # e.g. "chatfleet, prefix caching on"
    users: int
    turns: int
    max_tokens: int
    duration_s: float
    output_tokens: int
    turn_metrics: tuple[TurnMetrics, ...]
    error_samples: tuple[str, ...]

    @property
    def errors(self) -> int:
        return sum(turn.errors for turn in self.turn_metrics)

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def ttft_growth(self) -> float | None:
        """TTFT p50 of the last turn over that of the first; None when either is missing."""
        return ttft_growth(self.turn_metrics)


def ttft_growth(turns: Sequence[TurnMetrics]) -> float | None:
    """Last turn's TTFT p50 over the first turn's; None when either was not measured."""
    if not turns:
        return None
    first, last = turns[0].ttft_p50_ms, turns[-1].ttft_p50_ms
    if first is None or last is None or first <= 0:
        return None
    return last / first


def summarize_turns(results: Sequence[Sequence[RequestResult]], turns: int) -> list[TurnMetrics]:
    """Per turn index, over every conversation: results[user][turn - 1]. A conversation that failed
    at some turn has no later turns; those count as neither completed nor errors."""
    metrics = []
    for index in range(turns):
        at_turn = [conversation[index] for conversation in results if len(conversation) > index]
        done = [r for r in at_turn if r.ok]
        ttfts = [r.ttft for r in done]
        p50, p99 = percentile(ttfts, 50), percentile(ttfts, 99)
        metrics.append(
            TurnMetrics(
                turn=index + 1,
                completed=len(done),
                errors=len(at_turn) - len(done),
                ttft_p50_ms=None if p50 is None else p50 * 1000,
                ttft_p99_ms=None if p99 is None else p99 * 1000,
                mean_prompt_tokens=_mean([r.prompt_tokens for r in done]),
                mean_cached_tokens=_mean([r.cached_tokens for r in done]),
            )
        )
    return metrics


def _mean(values: Sequence[int]) -> float | None:
    return sum(values) / len(values) if values else None


def conversation_messages(
    history: Sequence[tuple[str, str]], next_user_message: str
) -> list[dict[str, str]]:
    """The request of one turn: the system prompt, every earlier (user, assistant) exchange and
    the new user message."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for user, assistant in history:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    messages.append({"role": "user", "content": next_user_message})
    return messages


async def run_multiturn(
    spec: MultiTurnSpec, label: str, transport: httpx.AsyncBaseTransport | None = None
) -> MultiTurnLevel:
    """Every user's conversation at once; each sends its next turn as soon as the previous answer
    has streamed in full. A failed turn ends that user's conversation."""
    results: list[list[RequestResult]] = [[] for _ in range(spec.users)]

    async def converse(user: int) -> None:
        history: list[tuple[str, str]] = []
        for turn in range(spec.turns):
            message = multiturn_message(user, turn)
            result = await stream_messages(
                client,
                spec.model,
                conversation_messages(history, message),
                spec.max_tokens,
                prompt_index=turn,
            )
            results[user].append(result)
            if not result.ok:
                return
            history.append((message, result.text))

    async with open_client(spec.base_url, spec.api_key, spec.users, transport) as client:
        started = time.perf_counter()
        await asyncio.gather(*(converse(user) for user in range(spec.users)))
        duration = time.perf_counter() - started
    flat = [r for conversation in results for r in conversation]
    return MultiTurnLevel(
        label=label,
        users=spec.users,
        turns=spec.turns,
        max_tokens=spec.max_tokens,
        duration_s=duration,
        output_tokens=sum(r.output_tokens for r in flat if r.ok),
        turn_metrics=tuple(summarize_turns(results, spec.turns)),
        error_samples=tuple(dict.fromkeys(r.error for r in flat if r.error))[:3],
    )
