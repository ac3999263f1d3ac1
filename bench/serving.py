"""`make bench`: the serving benchmark. Measures the HF `generate` baselines in-process, starts a
stack (controller, worker, gateway) on free ports, drives it with closed-loop streaming clients at
each concurrency level, then a structured-output level (16 chat streams with a JSON Schema
response_format against the same requests unconstrained, and the worker's grammar-mask time per
engine step), prints the figures against the targets and writes bench/results/.

    .venv/bin/python -m bench.serving [--levels 1,4,16,32] [--gateway-url URL] ...
    .venv/bin/python -m bench.serving --structured-only     # just the structured-output level
    .venv/bin/python -m bench.serving --peers vllm,llamacpp  # beside llama.cpp and vLLM, same run

The multi-turn level (--multiturn-users, 8 by default) runs on chatfleet with prefix caching on and,
in a second stack, off; with --peers on each peer too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from bench.baselines import Baselines, measure_baselines
from bench.loadgen import ChatLoadSpec, LoadSpec, run_level, scrape_counters, warm_up
from bench.metrics import LevelMetrics, StructuredLevel, counter_delta, summarize_level
from bench.multiturn import MultiTurnLevel, MultiTurnSpec, run_multiturn
from bench.peers import LABELS as PEER_LABELS
from bench.peers import PeerOptions, parse_peers, running_peer
from bench.prompts import PROMPT_SETS, STRUCTURED_PROMPTS, STRUCTURED_SCHEMA, load_prompt_set
from bench.report import (
    MULTITURN_CHATFLEET_OFF,
    MULTITURN_CHATFLEET_ON,
    evaluate_multiturn_targets,
    evaluate_peer_targets,
    evaluate_structured_targets,
    evaluate_targets,
    print_multiturn_report,
    print_peer_report,
    print_report,
    print_structured_report,
    print_targets,
    to_jsonable,
    write_json,
    write_plot,
)
from services.cli.launcher import ServiceExited, ServiceProcess, free_port, wait_models_listed
from services.common.config import FlagParser
from services.worker.default_models import DEFAULT_CHAT_MODEL_NAME, default_model_specs
from services.worker.engine.loading import QUANTIZATIONS

HOST = "127.0.0.1"
READY_TIMEOUT_S = 600.0
RESULTS_DIR = Path(__file__).resolve().parent / "results"
WARM_UP_TOKENS = 8
# The worker's counters (services/worker/metrics.py) behind the structured level's mask cost.
MASK_COUNTER = "chatfleet:structured_output_mask_seconds_total"
STEP_COUNTER = "chatfleet:engine_step_seconds_total"


@dataclass(frozen=True)
class BenchConfig:
    levels: tuple[int, ...]
    requests_per_level: int | None  # None: max(2 x concurrency, 8)
    max_tokens: int
    prompt_set: str
    prompts: tuple[str, ...]
    gateway_url: str | None  # None: start a stack
    model: str
    api_key: str | None
    skip_baselines: bool
    worker_args: tuple[str, ...]
    quantization: str  # the worker's --quantization, applied to the baselines' model too
    output_dir: Path
    strict: bool
    structured_level: int  # concurrency of the structured-output level; 0: not run
    structured_only: bool  # only that level: no baselines, no completions levels
    worker_metrics_url: str | None  # the worker's /metrics with --gateway-url; None: no mask cost
    peers: PeerOptions = dataclasses.field(default_factory=PeerOptions)  # default: no peers
    peer_levels: tuple[int, ...] = (1, 16, 32)
    multiturn_users: int = 0  # 0: no multi-turn level
    multiturn_turns: int = 10
    multiturn_max_tokens: int = 64
    multiturn_cache_off: bool = True  # also run it on a stack with --no-prefix-caching

    def requests_at(self, concurrency: int) -> int:
        return self.requests_per_level or max(2 * concurrency, 8)

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> BenchConfig:
        """Validate the flags; ValueError with a clear message."""
        try:
            levels = tuple(sorted({int(item) for item in ns.levels.split(",") if item.strip()}))
        except ValueError:
            raise ValueError(
                f"--levels must be comma-separated integers, got {ns.levels!r}"
            ) from None
        if not levels or levels[0] < 1:
            raise ValueError(f"--levels must be positive concurrency levels, got {ns.levels!r}")
        if ns.structured_level < 0:
            raise ValueError(f"--structured-level must be 0 or more, got {ns.structured_level}")
        if ns.structured_only and not ns.structured_level:
            raise ValueError("--structured-only needs a --structured-level above 0")
        if ns.worker_metrics_url and not ns.gateway_url:
            raise ValueError(
                "--worker-metrics-url is for --gateway-url; a started stack's worker is scraped "
                "on its own --metrics-port"
            )
        if ns.requests_per_level < 0:
            raise ValueError(f"--requests-per-level must be 0 or more, got {ns.requests_per_level}")
        if ns.max_tokens < 2:
            raise ValueError(
                f"--max-tokens must be at least 2 (TPOT needs two), got {ns.max_tokens}"
            )
        try:
            worker_args = tuple(shlex.split(ns.worker_args))
        except ValueError as exc:
            raise ValueError(f"--worker-args: {exc}") from None
        if ns.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"--quantization must be one of {', '.join(QUANTIZATIONS)}, got {ns.quantization!r}"
            )
        if ns.gateway_url and worker_args:
            raise ValueError(
                "--worker-args applies to the stack the benchmark starts, not to --gateway-url"
            )
        peers = parse_peers(ns.peers)
        peer_levels = _levels(ns.peer_levels, "--peer-levels")
        if ns.multiturn_users < 0 or ns.multiturn_turns < 1 or ns.multiturn_max_tokens < 1:
            raise ValueError(
                "--multiturn-users must be 0 or more, --multiturn-turns and "
                "--multiturn-max-tokens 1 or more"
            )
        if ns.llama_parallel < 1:
            raise ValueError(f"--llama-parallel must be 1 or more, got {ns.llama_parallel}")
        peer_options = PeerOptions(
            peers=peers,
            llamacpp_url=ns.llamacpp_url or None,
            llama_server=Path(ns.llama_server),
            llama_parallel=ns.llama_parallel,
            vllm_url=ns.vllm_url or None,
            vllm_python=Path(ns.vllm_python),
            vllm_model_dir=Path(ns.vllm_model_dir) if ns.vllm_model_dir else None,
            vllm_dtype=ns.vllm_dtype,
        )
        structured_only = ns.structured_only
        return cls(
            levels=() if ns.structured_only else levels,
            requests_per_level=ns.requests_per_level or None,
            max_tokens=ns.max_tokens,
            prompt_set=ns.prompt_set,
            prompts=load_prompt_set(ns.prompt_set),
            gateway_url=ns.gateway_url or None,
            model=ns.model,
            api_key=ns.api_key or None,
            skip_baselines=ns.skip_baselines,
            worker_args=worker_args,
            quantization=ns.quantization,
            output_dir=Path(ns.output_dir),
            strict=ns.strict,
            structured_level=ns.structured_level,
            structured_only=ns.structured_only,
            worker_metrics_url=ns.worker_metrics_url or None,
            peers=peer_options,
            peer_levels=() if structured_only else peer_levels,
            multiturn_users=0 if structured_only else ns.multiturn_users,
            multiturn_turns=ns.multiturn_turns,
            multiturn_max_tokens=ns.multiturn_max_tokens,
            multiturn_cache_off=ns.multiturn_cache_off and not ns.gateway_url,
        )


def _levels(text: str, flag: str) -> tuple[int, ...]:
    try:
        levels = tuple(sorted({int(item) for item in text.split(",") if item.strip()}))
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not levels or levels[0] < 1:
        raise ValueError(f"{flag} must be positive concurrency levels, got {text!r}")
    return levels


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.serving",
        description="Serving benchmark: streaming load at several concurrency levels, "
        "compared with in-process HF generate baselines.",
    )
    flags = FlagParser(parser, environ)

    def add(flag: str, **kwargs: Any) -> None:
        flags.add(
            flag, env="CHATFLEET_BENCH_" + flag.lstrip("-").replace("-", "_").upper(), **kwargs
        )

    add("--levels", default="1,4,16,32", help="comma-separated concurrency levels")
    add(
        "--requests-per-level", default=0, type=int,
        help="requests at every level; 0: max(2 x concurrency, 8)",
    )  # fmt: skip
    add("--max-tokens", default=128, type=int, help="output tokens of every request")
    add(
        "--prompt-set", default="mixed",
        help=f"built-in prompt set ({', '.join(PROMPT_SETS)}) or a JSON file of strings",
    )  # fmt: skip
    add("--gateway-url", default="", help="benchmark this running gateway instead of starting one")
    add("--model", default=DEFAULT_CHAT_MODEL_NAME, help="served model name to request")
    add("--api-key", default="", help="API key for a gateway that requires one")
    add(
        "--worker-args", default="",
        help="extra flags for `chatfleet worker` in the started stack, e.g. '--max-batch-size 32'",
    )  # fmt: skip
    add(
        "--quantization", default="auto",
        help="the worker's --quantization for the started stack (its default, auto: bf16 on "
        "an AMX CPU); the baselines load the same weights, so every ratio compares like with like",
    )  # fmt: skip
    add("--output-dir", default=str(RESULTS_DIR), help="where the JSON and PNG results go")
    add(
        "--structured-level", default=16, type=int,
        help="concurrency of the structured-output level (chat with a JSON Schema "
        "response_format vs the same requests unconstrained); 0: skip it",
    )  # fmt: skip
    add(
        "--worker-metrics-url", default="",
        help="with --gateway-url: the worker's Prometheus /metrics URL, for the grammar mask's "
        "share of an engine step",
    )  # fmt: skip
    add(
        "--peers", default="",
        help="also measure these peers in the same run, one at a time: llamacpp, vllm "
        "(set up by `make bench-peers-setup`)",
    )  # fmt: skip
    add("--peer-levels", default="1,16,32", help="concurrency levels of the peers")
    add("--llamacpp-url", default="", help="a running llama-server instead of starting one")
    add("--llama-server", default=str(PeerOptions.llama_server), help="llama-server binary")
    add(
        "--llama-parallel", default=PeerOptions.llama_parallel, type=int,
        help="llama-server --parallel slots (continuous batching)",
    )  # fmt: skip
    add("--vllm-url", default="", help="a running vLLM OpenAI server instead of starting one")
    add("--vllm-python", default=str(PeerOptions.vllm_python), help="python of the vLLM venv")
    add(
        "--vllm-model-dir", default="",
        help="HF folder vLLM serves; default: the GGUF dequantized into .tools/peer-models",
    )  # fmt: skip
    add("--vllm-dtype", default=PeerOptions.vllm_dtype, help="vLLM --dtype")
    add(
        "--multiturn-users", default=8, type=int,
        help="conversations of the multi-turn level at once; 0: skip the level",
    )  # fmt: skip
    add("--multiturn-turns", default=10, type=int, help="turns of every conversation")
    add("--multiturn-max-tokens", default=64, type=int, help="tokens of every answer")
    flags.add_bool(
        "--multiturn-cache-off", default=True,
        help="also run the multi-turn level on a stack with --no-prefix-caching",
        env="CHATFLEET_BENCH_MULTITURN_CACHE_OFF",
    )  # fmt: skip
    flags.add_bool(
        "--structured-only",
        help="run only the structured-output level (no baselines, no --levels)",
        env="CHATFLEET_BENCH_STRUCTURED_ONLY",
    )
    flags.add_bool(
        "--skip-baselines", help="do not measure the HF generate baselines",
        env="CHATFLEET_BENCH_SKIP_BASELINES",
    )  # fmt: skip
    flags.add_bool(
        "--strict", help="exit with status 3 when a target fails", env="CHATFLEET_BENCH_STRICT"
    )
    return parser


def machine_info() -> dict[str, Any]:
    import torch
    import transformers

    from services.worker.engine.quantization import INT8_DOT_FEATURES

    features = torch.cpu.get_capabilities()
    return {
        "cpu": features.get("cpu_name"),
        # What the figures hinge on: the SIMD width for float32, int8 dot products for int8.
        "cpu_features": sorted(
            name
            for name in ("avx2", "avx512_f", "avx512_bf16", "amx_tile", *INT8_DOT_FEATURES)
            if features.get(name)
        ),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def default_chat_model_path() -> str:
    """The GGUF the worker serves by default (the baselines load the very same file)."""
    return next(s.path for s in default_model_specs() if DEFAULT_CHAT_MODEL_NAME in s.names)


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=RESULTS_DIR.parent, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return done.stdout.strip()


@dataclass(frozen=True)
class Endpoints:
    """Where the benchmark reaches the stack."""

    gateway_url: str
    worker_metrics_url: str | None  # None: the worker's counters are not scraped


@contextlib.asynccontextmanager
async def started_stack(
    model: str, worker_args: Sequence[str], log_dir: Path, console: Console
) -> AsyncIterator[Endpoints]:
    """Controller, worker (default models plus worker_args, Prometheus metrics on a free port)
    and gateway on free loopback ports, started by the launcher `chatfleet up` uses; yields their
    URLs and always stops them."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    controller_port, worker_port, gateway_port = free_port(), free_port(), free_port()
    metrics_port = free_port()
    controller_address = f"{HOST}:{controller_port}"
    gateway_url = f"http://{HOST}:{gateway_port}"

    def service(name: str, port: int, args: Sequence[str] = ()) -> ServiceProcess:
        return ServiceProcess(
            name, ["--host", HOST, "--port", str(port), *args], env, str(log_dir / f"{name}.log")
        )

    controller = service("controller", controller_port)
    # worker_args come last, so they override the defaults above them.
    worker = service(
        "worker",
        worker_port,
        [
            "--controller-address", controller_address,
            "--metrics-port", str(metrics_port),
            *worker_args,
        ],
    )  # fmt: skip
    gateway = service("gateway", gateway_port, ["--controller-address", controller_address])
    started: list[ServiceProcess] = []
    try:
        console.print(f"starting controller, worker and gateway (logs in {log_dir})")
        controller.start()
        started.append(controller)
        await controller.wait_grpc_serving(controller_address, READY_TIMEOUT_S)
        worker.start()
        started.append(worker)
        await worker.wait_grpc_serving(f"{HOST}:{worker_port}", READY_TIMEOUT_S)
        gateway.start()
        started.append(gateway)
        await gateway.wait_http_ok(f"{gateway_url}/health", READY_TIMEOUT_S)
        await asyncio.wait_for(wait_models_listed(controller_address, [model]), READY_TIMEOUT_S)
        yield Endpoints(gateway_url, f"http://{HOST}:{metrics_port}/metrics")
    finally:
        for process in reversed(started):
            with contextlib.suppress(ProcessLookupError):
                await process.stop()


class LoadAverages(dict[str, list[float]]):
    """1-minute load averages taken after each phase: a figure measured while other work ran on
    the machine is suspect (the benchmark's own processes account for about its thread count)."""

    def mark(self, phase: str) -> None:
        self[phase] = list(os.getloadavg())


async def run_served(
    config: BenchConfig, endpoints: Endpoints, console: Console, load: LoadAverages
) -> tuple[list[LevelMetrics], StructuredLevel | None]:
    spec = LoadSpec(
        endpoints.gateway_url, config.model, config.prompts, config.max_tokens, config.api_key
    )
    levels = []
    if config.levels:
        await warm_up(spec, range(min(2, len(config.prompts))), WARM_UP_TOKENS)
    for concurrency in config.levels:
        requests = config.requests_at(concurrency)
        console.print(f"concurrency {concurrency}: {requests} requests...")
        results, duration = await run_level(spec, concurrency, requests)
        level = summarize_level(concurrency, results, duration)
        load.mark(f"after_level_{concurrency}")
        _print_level(console, level, duration)
        levels.append(level)
    structured = None
    if config.structured_level:
        structured = await run_structured(config, endpoints, console, load)
    return levels, structured


def _print_level(console: Console, level: LevelMetrics, duration: float) -> None:
    console.print(
        f"  {level.output_throughput:.1f} tok/s, TTFT p50 {level.ttft.p50_ms or 0:.0f} ms, "
        f"{level.errors} error(s), {duration:.1f} s"
    )


async def run_structured(
    config: BenchConfig, endpoints: Endpoints, console: Console, load: LoadAverages
) -> StructuredLevel:
    """The same chat requests unconstrained, then with the JSON Schema response_format; the
    worker's mask and step counters are read around the constrained run only."""
    concurrency = config.structured_level
    requests = config.requests_at(concurrency)
    plain = ChatLoadSpec(
        endpoints.gateway_url, config.model, STRUCTURED_PROMPTS, config.max_tokens,
        api_key=config.api_key,
    )  # fmt: skip
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "note", "schema": STRUCTURED_SCHEMA, "strict": True},
    }
    constrained = dataclasses.replace(plain, response_format=response_format)
    # The first constrained request compiles the schema (then cached by the worker): not timed.
    for spec in (plain, constrained):
        await warm_up(dataclasses.replace(spec, max_tokens=WARM_UP_TOKENS), range(1), 0)

    console.print(
        f"structured level, concurrency {concurrency}: {requests} requests unconstrained..."
    )
    results, duration = await run_level(plain, concurrency, requests)
    unconstrained = summarize_level(concurrency, results, duration)
    load.mark("after_structured_unconstrained")
    _print_level(console, unconstrained, duration)

    console.print(f"  ... and {requests} with response_format json_schema")
    before = await _counters(endpoints.worker_metrics_url, console)
    results, duration = await run_level(constrained, concurrency, requests)
    after = await _counters(endpoints.worker_metrics_url, console)
    constrained_level = summarize_level(concurrency, results, duration)
    load.mark("after_structured_constrained")
    _print_level(console, constrained_level, duration)
    return StructuredLevel(
        concurrency=concurrency,
        schema=STRUCTURED_SCHEMA,
        unconstrained=unconstrained,
        constrained=constrained_level,
        valid_outputs=sum(_follows_schema(r.text) for r in results if r.ok),
        mask_seconds=counter_delta(before, after, MASK_COUNTER),
        step_seconds=counter_delta(before, after, STEP_COUNTER),
    )


async def _counters(metrics_url: str | None, console: Console) -> dict[str, float]:
    if metrics_url is None:
        return {}
    try:
        return await scrape_counters(metrics_url, (MASK_COUNTER, STEP_COUNTER))
    except httpx.HTTPError as exc:
        console.print(f"[yellow]cannot read the worker's metrics at {metrics_url}: {exc}[/yellow]")
        return {}


def _follows_schema(text: str) -> bool:
    """A JSON object with the schema's required keys (answers cut by max_tokens are not)."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    required = STRUCTURED_SCHEMA["required"]
    assert isinstance(required, list)
    return isinstance(value, dict) and all(key in value for key in required)


@dataclass
class Measured:
    """Everything the served part of a run measured."""

    levels: list[LevelMetrics]
    structured: StructuredLevel | None
    gateway_url: str
    peers: dict[str, dict[int, LevelMetrics]] = dataclasses.field(default_factory=dict)
    multiturn: list[MultiTurnLevel] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)  # what could not be measured, why


async def serve_and_measure(
    config: BenchConfig, log_dir: Path, console: Console, load: LoadAverages
) -> Measured:
    """The peers first, one at a time, each stopped before the next starts; then chatfleet
    (levels, structured level, multi-turn with prefix caching); then, for the multi-turn level
    without prefix caching, a second stack."""
    peers: dict[str, dict[int, LevelMetrics]] = {}
    multiturn: list[MultiTurnLevel] = []
    notes: list[str] = []
    for peer in config.peers.peers:
        label = PEER_LABELS[peer]
        console.print(f"[bold]{label}[/bold]: starting (log in {log_dir / (peer + '.log')})")
        try:
            async with running_peer(
                peer, config.peers, config.model, Path(default_chat_model_path()), log_dir
            ) as url:
                peers[peer] = await run_peer_levels(config, url, console, load, peer)
                if config.multiturn_users:
                    multiturn.append(await multiturn_level(config, url, label, console, load))
        except (FileNotFoundError, ServiceExited, TimeoutError, RuntimeError) as exc:
            note = f"{label} not measured: {type(exc).__name__}: {exc}"
            console.print(f"[red]{note}[/red]")
            notes.append(note)
    if config.gateway_url:
        endpoints = Endpoints(config.gateway_url, config.worker_metrics_url)
        levels, structured = await run_served(config, endpoints, console, load)
        if config.multiturn_users:
            multiturn.append(
                await multiturn_level(
                    config, config.gateway_url, MULTITURN_CHATFLEET_ON, console, load
                )
            )
        return Measured(levels, structured, config.gateway_url, peers, multiturn, notes)
    worker_args = ("--quantization", config.quantization, *config.worker_args)
    async with started_stack(config.model, worker_args, log_dir, console) as endpoints:
        levels, structured = await run_served(config, endpoints, console, load)
        if config.multiturn_users:
            multiturn.append(
                await multiturn_level(
                    config, endpoints.gateway_url, MULTITURN_CHATFLEET_ON, console, load
                )
            )
        gateway_url = endpoints.gateway_url
    if config.multiturn_users and config.multiturn_cache_off:
        if not worker_has_prefix_caching_flag():
            note = (
                "the worker has no --no-prefix-caching flag (no prefix cache to switch off): "
                "the multi-turn level ran once, on today's worker"
            )
            console.print(f"[yellow]{note}[/yellow]")
            notes.append(note)
        else:
            off_dir = log_dir / "no-prefix-caching"
            off_dir.mkdir(parents=True, exist_ok=True)
            off_args = (*worker_args, "--no-prefix-caching")
            async with started_stack(config.model, off_args, off_dir, console) as endpoints:
                multiturn.append(
                    await multiturn_level(
                        config, endpoints.gateway_url, MULTITURN_CHATFLEET_OFF, console, load
                    )
                )
    return Measured(levels, structured, gateway_url, peers, multiturn, notes)


def worker_has_prefix_caching_flag() -> bool:
    """Whether `chatfleet worker` takes --no-prefix-caching (issue 16's prefix cache)."""
    done = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "worker", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    return "--no-prefix-caching" in done.stdout


async def run_peer_levels(
    config: BenchConfig, url: str, console: Console, load: LoadAverages, peer: str
) -> dict[int, LevelMetrics]:
    """The completions levels on a peer: the same prompts, token counts and request counts as
    chatfleet's."""
    spec = LoadSpec(url, config.model, config.prompts, config.max_tokens)
    await warm_up(spec, range(min(2, len(config.prompts))), WARM_UP_TOKENS)
    measured = {}
    for concurrency in config.peer_levels:
        requests = config.requests_at(concurrency)
        console.print(f"  {PEER_LABELS[peer]}, concurrency {concurrency}: {requests} requests...")
        results, duration = await run_level(spec, concurrency, requests)
        measured[concurrency] = level = summarize_level(concurrency, results, duration)
        load.mark(f"after_{peer}_level_{concurrency}")
        _print_level(console, level, duration)
    return measured


async def multiturn_level(
    config: BenchConfig, url: str, label: str, console: Console, load: LoadAverages
) -> MultiTurnLevel:
    spec = MultiTurnSpec(
        url,
        config.model,
        config.multiturn_users,
        config.multiturn_turns,
        config.multiturn_max_tokens,
        api_key=config.api_key if url == config.gateway_url else None,
    )
    console.print(
        f"multi-turn level ({label}): {spec.users} conversations x {spec.turns} turns, "
        f"{spec.max_tokens} tokens per answer..."
    )
    run = await run_multiturn(spec, label)
    load.mark(f"after_multiturn_{label}")
    growth = "-" if run.ttft_growth is None else f"{run.ttft_growth:.2f}x"
    console.print(
        f"  turn 1 TTFT p50 {run.turn_metrics[0].ttft_p50_ms or 0:.0f} ms, turn {run.turns} "
        f"{run.turn_metrics[-1].ttft_p50_ms or 0:.0f} ms ({growth}), {run.errors} failed "
        f"turn(s), {run.duration_s:.1f} s"
    )
    return run


def baselines_of(config: BenchConfig, console: Console, load: LoadAverages) -> Baselines:
    # Called before the stack starts, so the two never compete for the cores.
    console.print("measuring the HF generate baselines (in-process)...")
    baselines = measure_baselines(
        default_chat_model_path(), config.prompts, config.max_tokens, config.quantization
    )
    gc.collect()  # the baseline model is garbage now: give its memory back before serving
    load.mark("after_baselines")
    console.print(
        f"  single stream {baselines.single_tok_s:.1f} tok/s, "
        f"static batch of {baselines.batch_size} {baselines.batch_tok_s:.1f} tok/s"
    )
    return baselines


def main(argv: list[str] | None = None) -> int:
    console = Console()
    if console.width < 150:  # the level table needs room; logs and pipes default to 80 columns
        console = Console(width=150)
    parser = build_parser(os.environ)
    try:
        config = BenchConfig.from_namespace(parser.parse_args(argv))
    except ValueError as exc:
        parser.error(str(exc))
    config.output_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    machine = machine_info()
    load = LoadAverages()
    load.mark("start")
    if load["start"][0] > 0.5 * (machine["cpu_count"] or 1):
        console.print(
            f"[yellow]warning: load average {load['start'][0]:.2f} before the run: other work on "
            "this machine will distort the figures[/yellow]"
        )
    log_dir = config.output_dir / "logs" / stamp
    try:
        skip_baselines = config.skip_baselines or config.structured_only
        baselines = None if skip_baselines else baselines_of(config, console, load)
        if not config.gateway_url:
            log_dir.mkdir(parents=True)
        measured = asyncio.run(serve_and_measure(config, log_dir, console, load))
    except FileNotFoundError as exc:  # the default model is not installed
        console.print(f"[red]{exc}[/red]")
        return 1
    except (ServiceExited, TimeoutError, RuntimeError) as exc:
        logs = "" if config.gateway_url else f" (service logs in {log_dir})"
        console.print(f"[red]benchmark failed: {exc}[/red]{logs}")
        return 1
    except KeyboardInterrupt:
        return 130

    levels, structured, gateway_url = measured.levels, measured.structured, measured.gateway_url
    by_level = {level.concurrency: level for level in levels}
    targets = [] if config.structured_only else evaluate_targets(by_level, baselines)
    targets += evaluate_structured_targets(structured)
    if config.peers.peers:
        targets += evaluate_peer_targets(by_level, measured.peers)
    if config.multiturn_users:
        targets += evaluate_multiturn_targets(measured.multiturn)
    if levels:
        print_report(console, levels, baselines, [])
    if structured is not None:
        print_structured_report(console, structured)
    if measured.peers:
        print_peer_report(console, by_level, measured.peers, PEER_LABELS)
    print_multiturn_report(console, measured.multiturn)
    for note in measured.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    print_targets(console, targets)
    config_record = {
        key: value for key, value in vars(config).items() if key not in {"api_key", "prompts"}
    }
    document = {
        "timestamp": stamp,
        "config": {
            **config_record,
            "gateway_url": gateway_url,
            "started_stack": config.gateway_url is None,
            "requests_at_levels": {c: config.requests_at(c) for c in config.levels},
            "endpoint": "/v1/completions (stream, include_usage, temperature 0, ignore_eos)",
            "structured_endpoint": "/v1/chat/completions (stream, include_usage, temperature 0; "
            "response_format json_schema vs none)",
        },
        "machine": {**machine, "load_averages": load},
        "baselines": baselines,
        "levels": levels,
        "structured": structured,
        "peers": {PEER_LABELS[peer]: list(m.values()) for peer, m in measured.peers.items()},
        "multiturn": [
            {**to_jsonable(run), "ttft_growth": run.ttft_growth} for run in measured.multiturn
        ],
        "notes": measured.notes,
        "targets": targets,
    }
    # A structured-only run is a figure of its own: it leaves latest.json to the full runs.
    json_path = write_json(
        config.output_dir,
        f"{stamp}-structured" if config.structured_only else stamp,
        document,
        latest="latest-structured" if config.structured_only else "latest",
    )
    title = (
        f"chatfleet serving benchmark {stamp}: {config.model}, prompt set {config.prompt_set}, "
        f"{config.max_tokens} output tokens, {machine['cpu_count']} CPUs"
    )
    if levels:
        plot_path = write_plot(config.output_dir, stamp, levels, baselines, title)
        console.print(f"results: {json_path} and {plot_path} (+ latest.json, latest.png)")
    else:
        console.print(f"results: {json_path} (+ latest-structured.json)")
    structured_levels = (structured.unconstrained, structured.constrained) if structured else ()
    if any(level.errors for level in (*levels, *structured_levels)):
        return 1
    if any(run.errors for run in measured.multiturn):
        return 1
    if config.strict and any(t.status == "FAIL" for t in targets):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
