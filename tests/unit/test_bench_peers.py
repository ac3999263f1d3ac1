"""The benchmark's peers (llama.cpp server, vLLM CPU) and its multi-turn level, their pure parts:
peer names and command lines, verdicts against the peers, per-turn TTFT, and a whole multi-turn
run against a mock server that checks every turn resends the growing history (no servers)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from bench.metrics import LevelMetrics, RequestResult, summarize_level
from bench.multiturn import (
    SYSTEM_PROMPT,
    MultiTurnLevel,
    MultiTurnSpec,
    TurnMetrics,
    conversation_messages,
    run_multiturn,
    summarize_turns,
    ttft_growth,
)
from bench.peers import (
    llama_server_command,
    parse_peers,
    vllm_command,
    vllm_environment,
)
from bench.prompts import multiturn_message
from bench.report import (
    MULTITURN_CHATFLEET_OFF,
    MULTITURN_CHATFLEET_ON,
    evaluate_multiturn_targets,
    evaluate_peer_targets,
    peer_ratio,
)
from bench.serving import BenchConfig, build_parser


def test_parse_peers_orders_and_validates() -> None:
    assert parse_peers("") == ()
    assert parse_peers("vllm, llama.cpp") == ("llamacpp", "vllm")
    assert parse_peers("llamacpp") == ("llamacpp",)
    with pytest.raises(ValueError, match="unknown peer"):
        parse_peers("vllm,tgi")


def test_bench_config_takes_the_peer_and_multiturn_flags() -> None:
    parser = build_parser({})
    config = BenchConfig.from_namespace(
        parser.parse_args(
            ["--peers", "vllm,llamacpp", "--peer-levels", "32,1", "--vllm-url", "http://x:1/"]
        )
    )
    assert config.peers.peers == ("llamacpp", "vllm")
    assert config.peer_levels == (1, 32)
    assert config.peers.url_of("vllm") == "http://x:1/"
    assert config.peers.url_of("llamacpp") is None
    assert (config.multiturn_users, config.multiturn_turns) == (8, 10)
    assert config.multiturn_cache_off
    with pytest.raises(ValueError, match="--peer-levels"):
        BenchConfig.from_namespace(parser.parse_args(["--peer-levels", "0"]))
    with pytest.raises(ValueError, match="unknown peer"):
        BenchConfig.from_namespace(parser.parse_args(["--peers", "tgi"]))
    # A given gateway's prefix cache cannot be switched off by the benchmark.
    given = BenchConfig.from_namespace(parser.parse_args(["--gateway-url", "http://g:1"]))
    assert not given.multiturn_cache_off


def test_peer_command_lines() -> None:
    llama = llama_server_command(
        Path("/b/llama-server"), Path("/m/model.gguf"), 8123, "smol", 16, 2048, 2
    )
    assert llama[0] == "/b/llama-server"

    def flag(name: str) -> str:
        return llama[llama.index(name) + 1]

    assert flag("--model") == "/m/model.gguf" and flag("--alias") == "smol"
    assert flag("--host") == "127.0.0.1" and flag("--port") == "8123"
    assert flag("--parallel") == "16" and flag("--ctx-size") == str(16 * 2048)
    assert "--cont-batching" in llama

    vllm = vllm_command(Path("/v/bin/python"), Path("/m/hf"), 8124, "smol", "bfloat16", 32)
    assert vllm[:3] == ["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert vllm[vllm.index("--served-model-name") + 1] == "smol"
    assert vllm[vllm.index("--host") + 1] == "127.0.0.1"
    assert vllm[vllm.index("--dtype") + 1] == "bfloat16"

    env = vllm_environment({"PATH": "/bin"}, threads=1)
    assert env["PATH"] == "/bin" and env["HF_HUB_OFFLINE"] == "1"
    assert env["VLLM_CPU_KVCACHE_SPACE"].isdigit()
    assert len(env["VLLM_CPU_OMP_THREADS_BIND"].split(",")) == 1


def _level(concurrency: int, tok_s: float, errors: int = 0) -> LevelMetrics:
    """One request of 2 tokens over a level lasting 2 / tok_s seconds, plus failed requests."""
    results = [
        RequestResult(
            prompt_index=0, start=0.0, end=1.0, token_arrivals=[0.5, 1.0], output_tokens=2
        )
    ]
    results += [RequestResult(prompt_index=0, start=0.0, error="boom")] * errors
    return summarize_level(concurrency, results, 2.0 / tok_s)


def test_peer_targets_compare_levels_of_the_same_run() -> None:
    ours = {1: _level(1, 60.0), 16: _level(16, 300.0), 32: _level(32, 400.0)}
    peers = {
        "llamacpp": {1: _level(1, 74.0), 16: _level(16, 190.0), 32: _level(32, 300.0)},
        "vllm": {16: _level(16, 250.0), 32: _level(32, 500.0, errors=1)},
    }
    verdicts = {t.name: t.status for t in evaluate_peer_targets(ours, peers)}
    assert verdicts == {
        "vs llama.cpp server at 1": "PASS",  # 60 >= 0.75 x 74 = 55.5
        "vs vLLM CPU at 16": "PASS",  # 300 >= 250
        "vs vLLM CPU at 32": "SKIP",  # vLLM had a failed request at 32
        "vs llama.cpp server at 16": "PASS",  # 300 >= 1.5 x 190 = 285
        "vs llama.cpp server at 32": "FAIL",  # 400 < 1.5 x 300 = 450
    }
    none = {t.status for t in evaluate_peer_targets(ours, {})}
    assert none == {"SKIP"}
    assert peer_ratio(ours[16], peers["vllm"][16]) == pytest.approx(1.2)
    assert peer_ratio(ours[1], None) is None


def _turn(user: int, ttft: float, cached: int = 0, error: str | None = None) -> RequestResult:
    return RequestResult(
        prompt_index=user,
        start=0.0,
        end=ttft + 1.0,
        token_arrivals=[ttft, ttft + 1.0],
        prompt_tokens=100,
        output_tokens=2,
        cached_tokens=cached,
        error=error,
    )


def test_summarize_turns_per_turn_index() -> None:
    results = [
        [_turn(0, 0.1), _turn(0, 0.3, cached=80)],
        [_turn(1, 0.2), _turn(1, 0.5, cached=60)],
        # This conversation failed at turn 1 and so has no turn 2: neither completed nor error.
        [_turn(2, 0.0, error="HTTP 500: boom")],
    ]
    turns = summarize_turns(results, 2)
    assert [(t.turn, t.completed, t.errors) for t in turns] == [(1, 2, 1), (2, 2, 0)]
    assert turns[0].ttft_p50_ms == pytest.approx(150.0)
    assert turns[1].ttft_p50_ms == pytest.approx(400.0)
    assert turns[1].mean_cached_tokens == pytest.approx(70.0)
    assert ttft_growth(turns) == pytest.approx(400.0 / 150.0)
    empty = summarize_turns([[], []], 1)
    assert empty[0].ttft_p50_ms is None and ttft_growth(empty) is None


def _multiturn(label: str, first_ms: float, last_ms: float, errors: int = 0) -> MultiTurnLevel:
    def turn(index: int, ttft: float, failed: int) -> TurnMetrics:
        return TurnMetrics(index, 8, failed, ttft, ttft, 100.0, 0.0)

    return MultiTurnLevel(
        label, 8, 10, 64, 10.0, 1000, (turn(1, first_ms, errors), turn(10, last_ms, 0)), ()
    )


def test_multiturn_target_judges_the_prefix_cached_run_only() -> None:
    runs = [_multiturn(MULTITURN_CHATFLEET_ON, 100.0, 180.0), _multiturn("vLLM CPU", 10.0, 90.0)]
    (verdict,) = evaluate_multiturn_targets(runs)
    assert verdict.status == "PASS" and verdict.measured == pytest.approx(1.8)
    (verdict,) = evaluate_multiturn_targets([_multiturn(MULTITURN_CHATFLEET_ON, 100.0, 250.0)])
    assert verdict.status == "FAIL"
    (verdict,) = evaluate_multiturn_targets([_multiturn(MULTITURN_CHATFLEET_OFF, 100.0, 150.0)])
    assert verdict.status == "SKIP"
    (verdict,) = evaluate_multiturn_targets(
        [_multiturn(MULTITURN_CHATFLEET_ON, 100.0, 100.0, errors=1)]
    )
    assert verdict.status == "FAIL"


def test_multiturn_messages_are_fixed_and_differ_between_users() -> None:
    assert multiturn_message(0, 0) != multiturn_message(1, 0)
    assert multiturn_message(3, 4) == multiturn_message(3, 4)
    with pytest.raises(ValueError):
        multiturn_message(-1, 0)
    messages = conversation_messages([("hi", "hello"), ("more", "sure")], "last")
    assert [m["role"] for m in messages] == [
        "system", "user", "assistant", "user", "assistant", "user",
    ]  # fmt: skip
    assert messages[0]["content"] == SYSTEM_PROMPT and messages[-1]["content"] == "last"


async def test_run_multiturn_resends_the_growing_history() -> None:
    sent: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append(body)
        turn = (len(body["messages"]) - 2) // 2  # system + (user, assistant) x turn + user
        stream = "".join(
            f"data: {json.dumps(event)}\n\n"
            for event in (
                {"choices": [{"index": 0, "delta": {"content": f"answer {turn}"}}]},
                {"choices": [{"index": 0, "delta": {"content": "."}}]},
                {
                    "choices": [],
                    "usage": {
                        "prompt_tokens": 10 * (turn + 1),
                        "completion_tokens": 2,
                        "prompt_tokens_details": {"cached_tokens": 10 * turn},
                    },
                },
            )
        )
        return httpx.Response(
            200, text=stream + "data: [DONE]\n\n", headers={"content-type": "text/event-stream"}
        )

    spec = MultiTurnSpec("http://bench.test", "m", users=2, turns=3, max_tokens=2)
    run = await run_multiturn(spec, "mock", transport=httpx.MockTransport(handler))
    assert run.errors == 0 and len(sent) == 6 and run.output_tokens == 12
    assert [t.completed for t in run.turn_metrics] == [2, 2, 2]
    assert [t.mean_cached_tokens for t in run.turn_metrics] == [0.0, 10.0, 20.0]
    last = max(sent, key=lambda body: len(body["messages"]))  # type: ignore[arg-type]
    assert last["ignore_eos"] is True and last["max_tokens"] == 2
    assert [m["content"] for m in last["messages"] if m["role"] == "assistant"] == [  # type: ignore[attr-defined]
        "answer 0.",
        "answer 1.",
    ]
