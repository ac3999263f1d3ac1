"""End-to-end check of the worker's --quantization modes on the default chat model, in-process.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/quantization_modes.py [--modes none int8 bf16 int4]

One engine per mode, each with one torch thread (as one engine replica of the worker), loaded
through the worker's own loading path. Rounds alternate between the engines so machine noise hits
them alike: one greedy stream of --tokens tokens, then --streams concurrent greedy streams. Prints
the best round per mode, whether a request's tokens inside the concurrent batch equal its tokens
alone (batch invariance), and how many greedy tokens each mode shares with none (float32).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

from services.worker.default_models import default_model_specs
from services.worker.engine.factory import create_engine
from services.worker.engine.interface import (
    ChatMessage,
    Engine,
    GenerationRequest,
    SamplingParams,
    StoppingParams,
)
from services.worker.engine.loading import EngineOptions

PROMPTS = (
    "Write a long story about a lighthouse keeper.",
    "Explain how a steam engine works.",
    "What is the capital of France?",
    "List three primary colours and describe each.",
)


async def greedy(engine: Engine, index: int, tokens: int) -> list[int]:
    request = GenerationRequest(
        request_id=f"q{index}-{time.monotonic_ns()}",
        prompt=[ChatMessage("user", PROMPTS[index % len(PROMPTS)])],
        sampling=SamplingParams(temperature=0.0),
        stopping=StoppingParams(max_tokens=tokens, ignore_eos=True),
    )
    ids: list[int] = []
    async for chunk in engine.generate(request):
        ids.extend(chunk.token_ids)
    return ids


def shared_prefix(a: list[int], b: list[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", nargs="+", default=["none", "int8", "bf16", "int4"])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each engine")
    parser.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()

    engines: dict[str, Engine] = {}
    for mode in args.modes:
        options = EngineOptions(
            threads=args.threads,
            quantization=mode,
            max_running=max(32, args.streams),
            prefix_caching=args.prefix_caching,
        )
        engine = create_engine(default_model_specs()[0], options)
        started = time.perf_counter()
        await engine.start()
        print(f"{mode}: load and warm-up {time.perf_counter() - started:.1f}s", flush=True)
        engines[mode] = engine
    single: dict[str, list[float]] = {mode: [] for mode in engines}
    batched: dict[str, list[float]] = {mode: [] for mode in engines}
    alone: dict[str, list[list[int]]] = {}
    invariant: dict[str, bool] = {}
    try:
        for _ in range(args.rounds):
            for mode, engine in engines.items():
                started = time.perf_counter()
                await greedy(engine, 0, args.tokens)
                single[mode].append(args.tokens / (time.perf_counter() - started))
                started = time.perf_counter()
                together = await asyncio.gather(
                    *(greedy(engine, i, args.tokens) for i in range(args.streams))
                )
                batched[mode].append(sum(map(len, together)) / (time.perf_counter() - started))
                if mode not in alone:
                    alone[mode] = [await greedy(engine, i, args.tokens) for i in range(4)]
                    invariant[mode] = together[:4] == alone[mode]
    finally:
        for engine in engines.values():
            await engine.stop()
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; best of {args.rounds} rounds")
    for mode in engines:
        same = (
            [shared_prefix(a, b) for a, b in zip(alone[mode], alone["none"], strict=True)]
            if "none" in alone
            else []
        )
        print(
            f"{mode:5} single {max(single[mode]):5.1f} tok/s, {args.streams} streams "
            f"{max(batched[mode]):6.1f} tok/s; batch == alone: {invariant[mode]}; greedy "
            f"tokens shared with none per prompt: {same}"
        )


if __name__ == "__main__":
    asyncio.run(main())
