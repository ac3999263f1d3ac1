"""`make bench`: the serving benchmark. Measures the HF `generate` baselines in-process, starts a
stack (controller, worker, gateway) on free ports, drives it with closed-loop streaming clients at
each concurrency level, then a structured-output level (16 chat streams with a JSON Schema
response_format against the same requests unconstrained, and the worker's grammar-mask time per
engine step), prints the figures against the targets and writes bench/results/.

    .venv/bin/python -m bench.serving [--levels 1,4,16,32] [--gateway-url URL] ...
    .venv/bin/python -m bench.serving --structured-only     # just the structured-output level
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
from bench.prompts import PROMPT_SETS, STRUCTURED_PROMPTS, STRUCTURED_SCHEMA, load_prompt_set
from bench.report import (
    evaluate_structured_targets,
    evaluate_targets,
    print_report,
    print_structured_report,
    print_targets,
    write_json,
    write_plot,
)
from services.cli.launcher import ServiceExited, ServiceProcess, free_port, wait_models_listed
from services.common.config import FlagParser
from services.worker.default_models import DEFAULT_CHAT_MODEL_NAME, default_model_specs
from services.worker.loading import QUANTIZATIONS

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
        )


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
        "--quantization", default="none",
        help="the worker's --quantization for the started stack; the baselines load the same "
        "weights, so every ratio compares like with like",
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

    from services.worker.quantization import INT8_DOT_FEATURES

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


def _default_chat_model_path() -> str:
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


async def serve_and_measure(
    config: BenchConfig, log_dir: Path, console: Console, load: LoadAverages
) -> tuple[list[LevelMetrics], StructuredLevel | None, str]:
    if config.gateway_url:
        endpoints = Endpoints(config.gateway_url, config.worker_metrics_url)
        return *await run_served(config, endpoints, console, load), config.gateway_url
    worker_args = ("--quantization", config.quantization, *config.worker_args)
    async with started_stack(config.model, worker_args, log_dir, console) as endpoints:
        return *await run_served(config, endpoints, console, load), endpoints.gateway_url


def baselines_of(config: BenchConfig, console: Console, load: LoadAverages) -> Baselines:
    # Called before the stack starts, so the two never compete for the cores.
    console.print("measuring the HF generate baselines (in-process)...")
    baselines = measure_baselines(
        _default_chat_model_path(), config.prompts, config.max_tokens, config.quantization
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
        levels, structured, gateway_url = asyncio.run(
            serve_and_measure(config, log_dir, console, load)
        )
    except FileNotFoundError as exc:  # the default model is not installed
        console.print(f"[red]{exc}[/red]")
        return 1
    except (ServiceExited, TimeoutError, RuntimeError) as exc:
        logs = "" if config.gateway_url else f" (service logs in {log_dir})"
        console.print(f"[red]benchmark failed: {exc}[/red]{logs}")
        return 1
    except KeyboardInterrupt:
        return 130

    targets = (
        []
        if config.structured_only
        else evaluate_targets({level.concurrency: level for level in levels}, baselines)
    )
    targets += evaluate_structured_targets(structured)
    if levels:
        print_report(console, levels, baselines, [])
    if structured is not None:
        print_structured_report(console, structured)
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
    if config.strict and any(t.status == "FAIL" for t in targets):
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
