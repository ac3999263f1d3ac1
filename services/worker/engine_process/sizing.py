"""How many engine processes a worker runs, and each one's share of the machine: torch threads,
batch size, admission queue and KV cache budget."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace

from services.worker.engine.loading import (
    EngineOptions,
    ModelSpec,
    resolve_device,
    resolve_source,
    usable_cores,
)

# Auto replication stops where the replicas' weights would take more than this share of memory.
_REPLICA_MEMORY_SHARE = 0.25
# In-memory bytes of the weights per byte on disk: GGUF is dequantized (4-bit -> fp32 is 8x;
# counted as 4x, as files mix quantized and full tensors), other formats load fp16 -> fp32.
_GGUF_EXPANSION, _OTHER_EXPANSION = 4, 2
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def auto_replicas(specs: Sequence[ModelSpec], options: EngineOptions) -> int:
    """On a CPU, one engine process per usable core, each with one torch thread: an engine with
    several threads stalls at every OpenMP barrier whenever the serving processes (gRPC, the
    gateway, clients) take one of its cores for a moment, while single-threaded replicas just
    run a little slower (bench/README.md: 261 tok/s against 176 on 16 streams, 2 cores). Capped
    so the replicas' weights stay under a quarter of the machine's memory: large models get one
    process. On a GPU one process: the device is the engine, and replicas would split its memory.
    An explicit --threads also means one process with that many threads. A replica that is the
    only one with work borrows the idle ones' cores (engine/cores.py)."""
    cores = usable_cores()
    if options.threads is not None or cores == 1 or resolve_device(options.device).type != "cpu":
        return 1
    weights = sum(_estimated_weight_bytes(spec) for spec in specs)
    memory = _physical_memory()
    if not weights or not memory:
        return 1
    fits = int(memory * _REPLICA_MEMORY_SHARE // weights)
    return max(1, min(cores, fits))


def replica_options(options: EngineOptions, replicas: int) -> EngineOptions:
    """One replica's options: the usable cores (unless --threads says otherwise), the batch
    size, the queue and the KV cache budget shared out, rounding up."""
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    return replace(
        options,
        threads=options.threads or max(1, usable_cores() // replicas),
        max_running=_ceil_div(options.max_running, replicas),
        max_waiting=_ceil_div(options.max_waiting, replicas),
        kv_cache_tokens=_ceil_div(options.kv_cache_tokens, replicas),
    )


def _estimated_weight_bytes(spec: ModelSpec) -> int:
    source = resolve_source(spec.path)
    if source.gguf_file:
        return (source.directory / source.gguf_file).stat().st_size * _GGUF_EXPANSION
    files = [p for p in source.directory.iterdir() if p.suffix in _WEIGHT_SUFFIXES]
    return sum(p.stat().st_size for p in files) * _OTHER_EXPANSION


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
