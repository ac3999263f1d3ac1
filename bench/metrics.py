"""Per-request timings and the per-level serving metrics, with the definitions of vLLM's
benchmarks/benchmark_serving.py. Pure functions: no I/O, no clocks."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100) with linear interpolation between closest ranks, as numpy's
    default; None for no values."""
    if not 0 <= p <= 100:
        raise ValueError(f"percentile must be between 0 and 100, got {p}")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def inter_token_latencies(arrivals: Sequence[float]) -> list[float]:
    """Gaps between consecutive content chunks of one stream (ITL). A chunk that carries several
    tokens counts as one arrival, as in vLLM."""
    return [later - earlier for earlier, later in itertools.pairwise(arrivals)]


def time_per_output_token(ttft: float, e2e: float, output_tokens: int) -> float | None:
    """TPOT: the time after the first token, spread over the remaining tokens; None for fewer
    than two tokens (nothing to spread)."""
    if output_tokens < 2:
        return None
    return (e2e - ttft) / (output_tokens - 1)


@dataclass
class RequestResult:
    """What one streamed request observed; times are time.perf_counter() readings."""

    prompt_index: int
    start: float
    end: float = 0.0
    token_arrivals: list[float] = field(default_factory=list)  # content chunks only
    prompt_tokens: int = 0  # from the final chunk's usage
    output_tokens: int = 0  # from the final chunk's usage
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens, where the server reports it
    error: str | None = None
    text: str = ""  # the content received (kept to check structured outputs)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float:
        """Time to the first content chunk."""
        return self.token_arrivals[0] - self.start

    @property
    def e2e(self) -> float:
        """Time from sending the request to the end of the stream."""
        return self.end - self.start


@dataclass(frozen=True)
class Distribution:
    """Percentiles of one latency, in milliseconds; None when nothing was measured."""

    mean_ms: float | None
    p50_ms: float | None
    p99_ms: float | None

    @classmethod
    def of_seconds(cls, values: Sequence[float]) -> Distribution:
        def ms(value: float | None) -> float | None:
            return None if value is None else value * 1000

        mean = sum(values) / len(values) if values else None
        return cls(ms(mean), ms(percentile(values, 50)), ms(percentile(values, 99)))


@dataclass(frozen=True)
class LevelMetrics:
    """The figures of one concurrency level."""

    concurrency: int
    requests: int
    completed: int
    errors: int
    error_samples: tuple[str, ...]  # a few distinct error messages
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    output_throughput: float  # completion tokens of successful requests / wall time of the level
    request_throughput: float  # successful requests / wall time
    ttft: Distribution
    itl: Distribution
    tpot: Distribution
    e2e: Distribution


def summarize_level(
    concurrency: int, results: Sequence[RequestResult], duration_s: float
) -> LevelMetrics:
    """vLLM's calculate_metrics over one level's requests; failed requests only count as errors."""
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    itls = [gap for r in done for gap in inter_token_latencies(r.token_arrivals)]
    tpots = [
        tpot
        for r in done
        if (tpot := time_per_output_token(r.ttft, r.e2e, r.output_tokens)) is not None
    ]
    samples = tuple(dict.fromkeys(r.error for r in failed if r.error))[:3]
    return LevelMetrics(
        concurrency=concurrency,
        requests=len(results),
        completed=len(done),
        errors=len(failed),
        error_samples=samples,
        duration_s=duration_s,
        prompt_tokens=sum(r.prompt_tokens for r in done),
        output_tokens=output_tokens,
        output_throughput=output_tokens / duration_s if duration_s > 0 else 0.0,
        request_throughput=len(done) / duration_s if duration_s > 0 else 0.0,
        ttft=Distribution.of_seconds([r.ttft for r in done]),
        itl=Distribution.of_seconds(itls),
        tpot=Distribution.of_seconds(tpots),
        e2e=Distribution.of_seconds([r.e2e for r in done]),
    )


@dataclass(frozen=True)
class StructuredLevel:
    """The structured-output level: the same chat requests (prompts, max_tokens, concurrency) with
    a JSON Schema response_format and without one, and the worker's grammar-mask time over the
    constrained run as a fraction of its engine step time."""

    concurrency: int
    schema: dict[str, object]
    unconstrained: LevelMetrics
    constrained: LevelMetrics
    valid_outputs: int  # constrained answers that parse as JSON and hold the schema's required keys
    mask_seconds: float | None  # counter delta over the constrained run; None: not scraped
    step_seconds: float | None

    @property
    def throughput_ratio(self) -> float | None:
        """Constrained tok/s over unconstrained tok/s."""
        base = self.unconstrained.output_throughput
        return self.constrained.output_throughput / base if base > 0 else None

    @property
    def mask_fraction(self) -> float | None:
        return mask_fraction(self.mask_seconds, self.step_seconds)


def mask_fraction(mask_seconds: float | None, step_seconds: float | None) -> float | None:
    """Time spent computing token masks per second of engine steps; None when either counter is
    missing or no step ran."""
    if mask_seconds is None or step_seconds is None or step_seconds <= 0:
        return None
    return mask_seconds / step_seconds


def counter_delta(before: dict[str, float], after: dict[str, float], name: str) -> float | None:
    """How much a counter grew between two scrapes; None when a scrape lacks it."""
    if name not in before or name not in after:
        return None
    return after[name] - before[name]
