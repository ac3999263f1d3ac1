"""The serving benchmark's pure parts: percentiles, ITL/TPOT from synthetic timestamps, a level's
summary, target verdicts, and SSE parsing against a mock transport (no servers, no clocks)."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from bench.loadgen import LoadSpec, stream_completion
from bench.metrics import (
    LevelMetrics,
    RequestResult,
    inter_token_latencies,
    percentile,
    summarize_level,
    time_per_output_token,
)
from bench.report import evaluate_targets


@pytest.mark.parametrize("p", [0, 25, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear_interpolation(p: float) -> None:
    values = [0.3, 0.1, 0.7, 0.2, 1.5, 0.9, 0.4]
    assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))


def test_percentile_edge_cases() -> None:
    assert percentile([], 50) is None
    assert percentile([2.0], 99) == 2.0
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_itl_are_gaps_between_consecutive_arrivals() -> None:
    assert inter_token_latencies([10.0, 10.5, 10.75, 11.75]) == [0.5, 0.25, 1.0]
    assert inter_token_latencies([3.0]) == []
    assert inter_token_latencies([]) == []


def test_tpot_spreads_time_after_the_first_token() -> None:
    # 1 s to the first token, 5 s in all, 9 tokens: 4 s over the 8 after the first.
    assert time_per_output_token(ttft=1.0, e2e=5.0, output_tokens=9) == pytest.approx(0.5)
    assert time_per_output_token(ttft=1.0, e2e=5.0, output_tokens=1) is None


def _request(start: float, arrivals: list[float], end: float, tokens: int) -> RequestResult:
    return RequestResult(
        prompt_index=0,
        start=start,
        end=end,
        token_arrivals=arrivals,
        prompt_tokens=7,
        output_tokens=tokens,
    )


def test_summarize_level_uses_vllm_definitions_and_counts_errors() -> None:
    results = [
        _request(0.0, [0.2, 0.3, 0.4, 0.5], 0.5, 4),  # TTFT 0.2, ITL 0.1 x3, TPOT 0.1
        _request(0.0, [0.4, 0.7, 1.0], 1.0, 3),  # TTFT 0.4, ITL 0.3 x2, TPOT 0.3
        RequestResult(prompt_index=1, start=0.0, error="HTTP 503: overloaded"),
    ]
    level = summarize_level(concurrency=2, results=results, duration_s=2.0)
    assert (level.requests, level.completed, level.errors) == (3, 2, 1)
    assert level.error_samples == ("HTTP 503: overloaded",)
    assert level.output_tokens == 7  # usage counts of successful requests only
    assert level.prompt_tokens == 14
    assert level.output_throughput == pytest.approx(3.5)
    assert level.request_throughput == pytest.approx(1.0)
    assert level.ttft.p50_ms == pytest.approx(300.0)
    assert level.e2e.p50_ms == pytest.approx(750.0)
    # ITL pools the gaps of every request: 0.1, 0.1, 0.1, 0.3, 0.3.
    assert level.itl.p50_ms == pytest.approx(100.0)
    assert level.itl.mean_ms == pytest.approx(180.0)
    assert level.tpot.p50_ms == pytest.approx(200.0)


def test_summarize_level_with_every_request_failed() -> None:
    level = summarize_level(1, [RequestResult(prompt_index=0, start=0.0, error="boom")], 1.0)
    assert level.errors == 1
    assert level.output_throughput == 0.0
    assert level.ttft.p50_ms is None and level.itl.p99_ms is None


def test_targets_pass_fail_and_skip() -> None:
    def level(concurrency: int, tok_s: float, ttft_s: float) -> LevelMetrics:
        # One request of 2 tokens over a level lasting 2 / tok_s seconds.
        results = [_request(0.0, [ttft_s, ttft_s + 1.0], ttft_s + 1.0, 2)]
        return summarize_level(concurrency, results, 2.0 / tok_s)

    levels = {1: level(1, 10.0, 0.1), 16: level(16, 70.0, 0.5), 32: level(32, 60.0, 0.9)}
    verdicts = {t.name: t.status for t in evaluate_targets(levels, baselines=None)}
    assert verdicts == {
        "no errors": "PASS",
        "single stream": "SKIP",  # no baselines
        "batching gain": "PASS",  # 70 >= 6 x 10
        "vs static batch": "SKIP",
        "TTFT under load": "PASS",  # 500 ms
        "holds at 32": "FAIL",  # 60 < 0.95 x 70
    }


async def test_stream_completion_parses_sse_and_reads_usage() -> None:
    def chunk(body: dict[str, object]) -> str:
        return f"data: {json.dumps(body)}\n\n"

    stream = (
        chunk({"choices": [{"index": 0, "text": "Hello"}]})
        + chunk({"choices": [{"index": 0, "text": ""}]})  # no content: not a token arrival
        + chunk({"choices": [{"index": 0, "text": " world", "finish_reason": "length"}]})
        + chunk({"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
        + "data: [DONE]\n\n"
    )
    sent: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return httpx.Response(200, text=stream, headers={"content-type": "text/event-stream"})

    spec = LoadSpec("http://bench.test", "m", ("a prompt",), max_tokens=2)
    async with httpx.AsyncClient(
        base_url=spec.gateway_url, transport=httpx.MockTransport(handler)
    ) as client:
        result = await stream_completion(client, spec, 0)
        assert result.ok, result.error
        assert len(result.token_arrivals) == 2
        assert (result.prompt_tokens, result.output_tokens) == (5, 2)
        assert sent[0]["ignore_eos"] is True and sent[0]["temperature"] == 0.0
        assert sent[0]["stream_options"] == {"include_usage": True}

        # A stream shorter than max_tokens is an error, not a data point.
        spec_longer = LoadSpec("http://bench.test", "m", ("a prompt",), max_tokens=3)
        short = await stream_completion(client, spec_longer, 0)
        assert short.error == "2 completion tokens instead of 3"


async def test_stream_completion_reports_http_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"message": "model 'm' not found"}})

    spec = LoadSpec("http://bench.test", "m", ("a prompt",), max_tokens=2)
    async with httpx.AsyncClient(
        base_url=spec.gateway_url, transport=httpx.MockTransport(handler)
    ) as client:
        result = await stream_completion(client, spec, 0)
    assert result.error is not None and result.error.startswith("HTTP 404")
