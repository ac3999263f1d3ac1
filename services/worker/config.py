"""The worker's configuration: a frozen dataclass from flags with CHATFLEET_* fallbacks."""

from __future__ import annotations

import argparse
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.common.config import LOG_FORMATS, LOG_LEVELS, FlagParser, add_logging_flags
from services.common.fastchat_compat import (
    UNSUPPORTED_WORKER_FLAGS,
    add_unsupported_flags,
    host_port,
    parse_memory,
)
from services.common.metrics_server import add_metrics_port_flag, check_metrics_port
from services.common.security import GrpcSecurity, add_security_flags
from services.worker.default_models import default_model_specs
from services.worker.engine.loading import DTYPES, QUANTIZATIONS, EngineOptions, ModelSpec
from services.worker.engine.output_parsing import REASONING_PARSERS, TOOL_CALL_PARSERS

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}
# Environment values of the repeatable model flags hold one entry per model separated by ";"
# (a model's names are themselves separated by commas).
_ENV_SEPARATOR = ";"
TOOL_CALL_PARSER_CHOICES = ("auto", *TOOL_CALL_PARSERS)
REASONING_PARSER_CHOICES = ("auto", *REASONING_PARSERS, "none")


@dataclass(frozen=True)
class WorkerConfig:
    models: tuple[ModelSpec, ...]
    host: str = "127.0.0.1"
    port: int = 21002
    # The address registered with the controller; None: host and the port actually bound.
    worker_address: str | None = None
    controller_address: str = "127.0.0.1:21001"
    no_register: bool = False
    device: str = "auto"
    dtype: str = "auto"
    max_running: int = EngineOptions.max_running
    max_waiting: int = EngineOptions.max_waiting
    threads: int | None = None
    max_batch_tokens: int = EngineOptions.max_batch_tokens
    kv_cache_tokens: int = EngineOptions.kv_cache_tokens
    packed: bool = EngineOptions.packed
    prefix_caching: bool = EngineOptions.prefix_caching
    # The served default: smaller weights where the CPU multiplies them fast (approximate);
    # in-process engines (EngineOptions) stay exact unless asked.
    quantization: str = "auto"
    # Run the models in a child process of their own (with every core for torch), so the gRPC
    # server never takes the engine's GIL or time slices; False keeps them in this process.
    engine_process: bool = True
    # Engine processes per model, each with its share of the cores and of the batch; None: auto.
    engine_replicas: int | None = None
    # The sampling seed of every request that brings none (FastChat's --seed).
    seed: int | None = None
    # FastChat's --num-gpus and --max-gpu-memory: a model runs on one device, so several GPUs are
    # refused, and the memory cap (which FastChat applies only when splitting a model over
    # several GPUs) has nothing to act on.
    num_gpus: int = 1
    max_gpu_memory: str | None = None
    heartbeat_interval: float = 5.0
    # How long in-flight requests may take to finish after SIGTERM.
    shutdown_grace: float = 10.0
    # Token and TLS of its server, and of its calls to the controller.
    security: GrpcSecurity = field(default_factory=GrpcSecurity)
    log_level: str = "INFO"
    log_format: str = "text"
    # Port of the Prometheus /metrics endpoint (0: a free one); None: no endpoint.
    metrics_port: int | None = None
    # How tool calls and reasoning are parsed from every model's output; auto: detected from
    # each model's chat template (services/worker/engine/output_parsing.py).
    tool_call_parser: str = "auto"
    reasoning_parser: str = "auto"

    def __post_init__(self) -> None:
        check_metrics_port(self.metrics_port)
        if not self.models:
            raise ValueError("at least one model is needed (--model-path)")
        _check_unique_names(self.models)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be between 0 and 65535, got {self.port}")
        if self.worker_address is not None and not self.worker_address.strip():
            raise ValueError("--worker-address must not be empty")
        if not self.no_register and not self.controller_address.strip():
            raise ValueError("--controller-address is required unless --no-register is given")
        if not _DEVICE.fullmatch(self.device):
            raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps: {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.max_running < 1:
            raise ValueError(f"--max-batch-size must be at least 1, got {self.max_running}")
        if self.max_waiting < 0:
            raise ValueError(f"--max-queue must not be negative, got {self.max_waiting}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if self.engine_replicas is not None and self.engine_replicas < 1:
            raise ValueError(
                f"--engine-replicas must be 0 (auto) or more, got {self.engine_replicas}"
            )
        if self.engine_replicas is not None and not self.engine_process:
            raise ValueError("--engine-replicas needs the engine process (not --no-engine-process)")
        if self.max_batch_tokens < self.max_running:
            raise ValueError(
                f"--max-batch-tokens ({self.max_batch_tokens}) must be at least "
                f"--max-batch-size ({self.max_running})"
            )
        if self.kv_cache_tokens < 256:
            raise ValueError(f"--kv-cache-tokens must be at least 256, got {self.kv_cache_tokens}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"--quantization must be one of {', '.join(QUANTIZATIONS)}, "
                f"got {self.quantization!r}"
            )
        if self.quantization not in ("auto", "none") and self.device not in ("auto", "cpu"):
            raise ValueError(
                f"--quantization {self.quantization} (or --load-8bit): {self.quantization} "
                f"weights run on the CPU only, not on {self.device}; use --device cpu or drop "
                "the flag"
            )
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"--seed must be between 0 and 2**64 - 1, got {self.seed}")
        if self.num_gpus < 1:
            raise ValueError(f"--num-gpus must be at least 1, got {self.num_gpus}")
        if self.num_gpus > 1 and self.device != "cpu":
            raise ValueError(
                f"--num-gpus {self.num_gpus}: chatfleet runs each model on one device; start one "
                "worker per GPU (--device cuda:0, --device cuda:1, ...) and the controller "
                "balances requests between them"
            )
        if not self.heartbeat_interval > 0:
            raise ValueError(f"--heartbeat-interval must be > 0, got {self.heartbeat_interval}")
        if not self.shutdown_grace >= 0:
            raise ValueError(f"--shutdown-grace must not be negative, got {self.shutdown_grace}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
        if self.tool_call_parser not in TOOL_CALL_PARSER_CHOICES:
            raise ValueError(
                f"--tool-call-parser must be one of {', '.join(TOOL_CALL_PARSER_CHOICES)}, "
                f"got {self.tool_call_parser!r}"
            )
        if self.reasoning_parser not in REASONING_PARSER_CHOICES:
            raise ValueError(
                f"--reasoning-parser must be one of {', '.join(REASONING_PARSER_CHOICES)}, "
                f"got {self.reasoning_parser!r}"
            )

    def engine_options(self) -> EngineOptions:
        return EngineOptions(
            device=self.device,
            dtype=self.dtype,
            max_running=self.max_running,
            max_waiting=self.max_waiting,
            threads=self.threads,
            max_batch_tokens=self.max_batch_tokens,
            kv_cache_tokens=self.kv_cache_tokens,
            packed=self.packed,
            prefix_caching=self.prefix_caching,
            quantization=self.quantization,
        )

    def advertised_address(self, bound_port: int) -> str:
        """What the worker registers: --worker-address, else host and the port actually bound
        (a wildcard host is replaced by this machine's name, which peers can resolve)."""
        if self.worker_address is not None:
            return self.worker_address.strip()
        host = socket.gethostname() if self.host in _WILDCARD_HOSTS else self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # an IPv6 literal
        return f"{host}:{bound_port}"

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> WorkerConfig:
        """Build and validate the config from parsed flags; ValueError with a clear message."""
        return cls(
            models=model_specs(ns.model_path or [], ns.model_names or []),
            host=ns.host,
            port=ns.port,
            # FastChat writes addresses as URLs (http://host:port): gRPC wants host:port.
            worker_address=host_port(ns.worker_address) if ns.worker_address else None,
            controller_address=host_port(ns.controller_address),
            no_register=not ns.register,
            device=ns.device,
            dtype=ns.dtype,
            max_running=ns.max_batch_size,
            max_waiting=ns.max_queue,
            threads=ns.threads or None,
            max_batch_tokens=ns.max_batch_tokens,
            kv_cache_tokens=ns.kv_cache_tokens,
            packed=ns.packed,
            prefix_caching=ns.prefix_caching,
            quantization=ns.quantization,
            engine_process=ns.engine_process,
            engine_replicas=ns.engine_replicas or None,
            seed=ns.seed,
            num_gpus=ns.num_gpus,
            max_gpu_memory=ns.max_gpu_memory,
            heartbeat_interval=ns.heartbeat_interval,
            shutdown_grace=ns.shutdown_grace,
            security=GrpcSecurity.from_namespace(ns),
            log_level=ns.log_level.upper(),
            log_format=ns.log_format,
            metrics_port=ns.metrics_port,
            tool_call_parser=ns.tool_call_parser,
            reasoning_parser=ns.reasoning_parser,
        )


def model_specs(paths: Sequence[str], names: Sequence[str]) -> tuple[ModelSpec, ...]:
    """Pair each --model-path with its --model-names (comma-separated; empty derives the name from
    the path). Without any path: the two default models."""
    if not paths:
        if names:
            raise ValueError("--model-names needs a matching --model-path")
        try:
            return tuple(default_model_specs())
        except FileNotFoundError as error:
            raise ValueError(str(error)) from error
    if names and len(names) != len(paths):
        raise ValueError(
            f"give --model-names once per --model-path ({len(paths)} paths, {len(names)} names); "
            "use an empty value to derive a model's name from its path"
        )
    specs = []
    for index, path in enumerate(paths):
        if not path.strip():
            raise ValueError("--model-path must not be empty")
        group = names[index] if names else ""
        served = tuple(name.strip() for name in group.split(",") if name.strip())
        specs.append(ModelSpec(path=path.strip(), names=served))
    return tuple(specs)


def _check_unique_names(specs: Sequence[ModelSpec]) -> None:
    seen: dict[str, str] = {}
    for spec in specs:
        for name in spec.names:
            if name in seen:
                where = "twice" if seen[name] == spec.path else f"by {seen[name]} and {spec.path}"
                raise ValueError(f"the model name {name!r} is used {where}")
            seen[name] = spec.path


class _RepeatableAction(argparse.Action):
    """Like action="append", but the first use on the command line replaces the default (which may
    come from the environment) instead of adding to it."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest, None)
        items = [] if current is None or current is self.default else list(current)
        items.append(values)
        setattr(namespace, self.dest, items)


def _add_repeatable(
    parser: argparse.ArgumentParser, environ: Mapping[str, str], flag: str, env: str, help: str
) -> None:
    raw = environ.get(env)
    default = raw.split(_ENV_SEPARATOR) if raw else None
    parser.add_argument(
        flag,
        action=_RepeatableAction,
        default=default,
        help=f"{help} (repeatable; env {env}, one entry per model separated by ';')",
    )


def add_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Declare the worker's flags on `parser`, with defaults from `environ`."""
    flags = FlagParser(parser, environ)
    defaults = WorkerConfig  # the class attributes hold the fields' defaults
    flags.add(
        "--host", default=defaults.host, help="address to listen on", env="CHATFLEET_WORKER_HOST"
    )
    flags.add(
        "--port",
        default=defaults.port,
        type=int,
        help="port to listen on (0 picks a free one)",
        env="CHATFLEET_WORKER_PORT",
    )
    flags.add(
        "--worker-address",
        default=None,
        help="host:port the controller and gateway use to reach this worker "
        "(default: --host and the port actually bound)",
    )
    flags.add(
        "--controller-address",
        default=defaults.controller_address,
        help="host:port of the controller to register with",
    )
    flags.add_bool(
        "--register",
        default=True,
        help="register with the controller (--no-register: serve standalone)",
        env="CHATFLEET_WORKER_REGISTER",
    )
    _add_repeatable(
        parser,
        environ,
        "--model-path",
        "CHATFLEET_MODEL_PATH",
        "a model to serve: a Hugging Face folder, a .gguf file, or a folder holding one .gguf "
        "(default: the two default models)",
    )
    _add_repeatable(
        parser,
        environ,
        "--model-names",
        "CHATFLEET_MODEL_NAMES",
        "comma-separated names the matching --model-path is served as, the first canonical "
        "(default: derived from the path)",
    )
    flags.add(
        "--device",
        default=defaults.device,
        help="where models run: auto, cpu, cuda, cuda:N or mps",
    )
    flags.add("--dtype", default=defaults.dtype, choices=DTYPES, help="weights' data type")
    flags.add(
        "--max-batch-size",
        "--limit-worker-concurrency",
        default=defaults.max_running,
        type=int,
        help="requests decoded together per model; more wait in the queue "
        "(--limit-worker-concurrency is FastChat's name)",
    )
    flags.add(
        "--max-queue",
        default=defaults.max_waiting,
        type=int,
        help="requests waiting for a batch slot per model before new ones are refused",
    )
    flags.add(
        "--threads",
        default=None,
        type=int,
        help="torch intra-op threads of each engine process (default: the usable cores shared "
        "by the engine processes, a lone busy one taking them all; usable cores minus one with "
        "--no-engine-process); giving it makes --engine-replicas auto choose one process",
    )
    flags.add(
        "--max-batch-tokens",
        default=defaults.max_batch_tokens,
        type=int,
        help="tokens one engine step forwards: a token per decoding request, prompt chunks of "
        "joining requests in the rest (chunked prefill)",
    )
    flags.add(
        "--kv-cache-tokens",
        default=defaults.kv_cache_tokens,
        type=int,
        help="KV cache budget per model in token positions; the newest requests wait when full",
    )
    flags.add(
        "--quantization",
        default=defaults.quantization,
        choices=QUANTIZATIONS,
        help="weights of the linear layers (CPU only; in every mode a request's greedy output "
        "does not depend on what else is in its batch). none: float32, exact: greedy output "
        "equals float32 generate; bf16 (approximate: differs from float32 generate): bfloat16 "
        "weights pre-packed for oneDNN, a speed-up with AMX; int8 (approximate, likewise): int8 "
        "weights and per-token int8 activations, a speed-up only with VNNI or AMX int8 "
        "instructions; int4 (approximate, likewise): 4-bit weights (a Q4 GGUF's own grid) for "
        "generated tokens, and for prompts where that beats bf16 layers (no AMX), fastest for "
        "one or a few streams; w4a8 (approximate, and sooner): int4 with inputs rounded to 8 "
        "bits (int8 dot products, as llama.cpp), faster under load; auto (the default): for "
        "generative models on a CPU, bf16 "
        "with AMX-BF16, else int8 with VNNI, else none; embeddings and GPUs stay none. The "
        "worker logs the mode it resolved to",
    )
    parser.add_argument(
        "--load-8bit",
        dest="quantization",
        action="store_const",
        const="int8",
        default=argparse.SUPPRESS,
        help="FastChat's flag: the same as --quantization int8, CPU only "
        "(env CHATFLEET_QUANTIZATION=int8)",
    )
    flags.add(
        "--num-gpus",
        default=defaults.num_gpus,
        type=int,
        help="GPUs a model is split over, as in FastChat: only 1 (one worker per GPU instead); "
        "ignored with --device cpu",
    )
    flags.add(
        "--max-gpu-memory",
        default=None,
        type=parse_memory,
        help="FastChat's per-GPU weight memory cap such as 13GiB; as in FastChat with one GPU it "
        "has no effect",
    )
    parser.add_argument(
        "--embed-in-truncate",
        action="store_true",
        help="FastChat's flag, accepted as chatfleet always does this: an embedding input longer "
        "than the model's context is truncated to it",
    )
    flags.add(
        "--seed",
        default=None,
        type=int,
        help="sampling seed of every request that gives none (the same prompt and settings then "
        "give the same answer)",
        env="CHATFLEET_WORKER_SEED",
    )
    flags.add_bool(
        "--engine-process",
        default=True,
        help="run the models in a child process with every core for torch, apart from the gRPC "
        "server; --no-engine-process runs them in the worker's own process",
    )
    flags.add(
        "--engine-replicas",
        default=0,
        type=int,
        help="engine processes per worker, each loading every model and taking its share of the "
        "cores, batch size, queue and KV cache; requests go to the least busy (0: auto, one "
        "per usable core on a CPU while the copies of the weights take under a quarter of the "
        "memory, else one)",
    )
    flags.add_bool(
        "--packed",
        default=defaults.packed,
        help="batch all running requests in one packed forward (Llama-family models); "
        "--no-packed forwards each request alone",
    )
    flags.add_bool(
        "--prefix-caching",
        default=defaults.prefix_caching,
        help="reuse the keys and values of prompt prefixes earlier requests computed (a chat's "
        "earlier turns, a shared system prompt) within --kv-cache-tokens, least recently used "
        "evicted first; exact: answers do not change (packed runner only)",
        env="CHATFLEET_PREFIX_CACHING",
    )
    flags.add(
        "--heartbeat-interval",
        default=defaults.heartbeat_interval,
        type=float,
        help="seconds between load reports to the controller",
        env="CHATFLEET_WORKER_HEARTBEAT_INTERVAL",
    )
    flags.add(
        "--shutdown-grace",
        default=defaults.shutdown_grace,
        type=float,
        help="seconds in-flight requests may take to finish on SIGTERM",
        env="CHATFLEET_WORKER_SHUTDOWN_GRACE",
    )
    flags.add(
        "--tool-call-parser",
        default=defaults.tool_call_parser,
        choices=TOOL_CALL_PARSER_CHOICES,
        help="how tool calls are read from the models' output: hermes (<tool_call> blocks), "
        "llama3_json, mistral ([TOOL_CALLS]); auto: from each model's chat template, hermes "
        "when it has no tool syntax (the worker then describes tools Hermes-style)",
    )
    flags.add(
        "--reasoning-parser",
        default=defaults.reasoning_parser,
        choices=REASONING_PARSER_CHOICES,
        help="how reasoning is split from the answer: think (<think> blocks), none; auto: "
        "think for models whose chat template uses <think>",
    )
    add_security_flags(flags)
    add_logging_flags(flags, level=defaults.log_level, fmt=defaults.log_format)
    add_metrics_port_flag(flags, env="CHATFLEET_WORKER_METRICS_PORT")
    add_unsupported_flags(parser, UNSUPPORTED_WORKER_FLAGS)
