"""The serving benchmark's pure parts: percentiles, ITL/TPOT from synthetic timestamps, a level's
summary, target verdicts, and SSE parsing against a mock transport (no servers, no clocks)."""

from __future__ import annotations

import dataclasses
import json

import httpx
import numpy as np
import pytest

from bench.loadgen import ChatLoadSpec, LoadSpec, parse_counters, stream_chat, stream_completion
from bench.metrics import (
    LevelMetrics,
    RequestResult,
    StructuredLevel,
    counter_delta,
    inter_token_latencies,
    mask_fraction,
    percentile,
    summarize_level,
    time_per_output_token,
)
from bench.report import evaluate_structured_targets, evaluate_targets


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


async def test_stream_chat_keeps_the_text_and_sends_the_response_format() -> None:
    def chunk(body: dict[str, object]) -> str:
        return f"data: {json.dumps(body)}\n\n"

    stream = (
        chunk({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        + chunk({"choices": [{"index": 0, "delta": {"content": '{"a"'}}]})
        + chunk({"choices": [{"index": 0, "delta": {"content": ": 1}"}, "finish_reason": "stop"}]})
        + chunk({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}})
        + "data: [DONE]\n\n"
    )
    sent: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/chat/completions"
        sent.append(json.loads(request.content))
        return httpx.Response(200, text=stream, headers={"content-type": "text/event-stream"})

    response_format = {"type": "json_schema", "json_schema": {"name": "n", "schema": {}}}
    spec = ChatLoadSpec("http://bench.test", "m", ("a prompt",), 8, response_format)
    async with httpx.AsyncClient(
        base_url=spec.gateway_url, transport=httpx.MockTransport(handler)
    ) as client:
        result = await stream_chat(client, spec, 0)
        # An answer shorter than max_tokens is complete: a JSON object ended it.
        assert result.ok, result.error
        assert result.text == '{"a": 1}'
        assert len(result.token_arrivals) == 2
        assert (result.prompt_tokens, result.output_tokens) == (7, 3)
        assert sent[0]["response_format"] == response_format
        assert sent[0]["messages"] == [{"role": "user", "content": "a prompt"}]
        assert "ignore_eos" not in sent[0]

        plain = await stream_chat(client, ChatLoadSpec("http://bench.test", "m", ("p",), 2), 0)
        assert plain.error == "3 completion tokens, expected 1 to 2"
        assert "response_format" not in sent[1]


def test_parse_counters_sums_the_models_samples() -> None:
    exposition = (
        "# TYPE chatfleet:engine_step_seconds counter\n"
        'chatfleet:engine_step_seconds_total{model_name="a"} 2.5\n'
        'chatfleet:engine_step_seconds_total{model_name="b"} 1.5\n'
        'chatfleet:engine_step_seconds_created{model_name="a"} 1.7e9\n'
        "# TYPE chatfleet:num_requests_running gauge\n"
        'chatfleet:num_requests_running{model_name="a"} 3\n'
    )
    names = (
        "chatfleet:engine_step_seconds_total",
        "chatfleet:structured_output_mask_seconds_total",
    )
    assert parse_counters(exposition, names) == {"chatfleet:engine_step_seconds_total": 4.0}


def test_mask_fraction_and_counter_deltas() -> None:
    before, after = {"mask": 1.0, "step": 10.0}, {"mask": 1.5, "step": 14.0}
    assert counter_delta(before, after, "mask") == 0.5
    assert counter_delta({}, after, "mask") is None
    assert mask_fraction(0.5, 4.0) == 0.125
    assert mask_fraction(None, 4.0) is None
    assert mask_fraction(0.5, 0.0) is None


def _structured(mask: float | None, step: float | None, errors: int = 0) -> StructuredLevel:
    def level(tok_s: float) -> LevelMetrics:
        return summarize_level(16, [_request(0.0, [0.5, 1.5], 1.5, 2)], 2.0 / tok_s)

    constrained = dataclasses.replace(level(70.0), errors=errors)
    return StructuredLevel(16, {}, level(80.0), constrained, 16, mask, step)


def test_structured_targets() -> None:
    passing = _structured(0.3, 4.0)
    assert passing.throughput_ratio == pytest.approx(70.0 / 80.0)
    statuses = {t.name: t.status for t in evaluate_structured_targets(passing)}
    assert statuses == {"structured no errors": "PASS", "structured mask": "PASS"}  # 7.5%
    statuses = {t.name: t.status for t in evaluate_structured_targets(_structured(1.0, 4.0, 1))}
    assert statuses == {"structured no errors": "FAIL", "structured mask": "FAIL"}  # 25%
    statuses = {t.name: t.status for t in evaluate_structured_targets(_structured(None, 4.0))}
    assert statuses["structured mask"] == "SKIP"
    assert [t.status for t in evaluate_structured_targets(None)] == ["SKIP"]
