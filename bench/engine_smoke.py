"""Single-stream decode speed of the engine vs plain `model.generate` on the default chat model.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/engine_smoke.py [--tokens 128] [--rounds 3]

Greedy, ignore_eos, the same prompt and the same loaded weights (generate runs on the engine's
model between engine runs); rounds alternate so machine noise hits both. Prints the best round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import torch

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

PROMPT = [ChatMessage("user", "Write a long story about a lighthouse keeper.")]


async def engine_run(engine: Engine, tokens: int, streams: int = 1) -> tuple[float, float, int]:
    """(seconds in total, seconds after the first chunk, tokens generated) for `streams` at once."""

    async def one(i: int) -> tuple[float, int]:
        request = GenerationRequest(
            request_id=f"bench-{i}",
            prompt=PROMPT,
            sampling=SamplingParams(temperature=0.0),
            stopping=StoppingParams(max_tokens=tokens, ignore_eos=True),
        )
        first = 0.0
        count = 0
        async for chunk in engine.generate(request):
            count += len(chunk.token_ids)
            if not first:
                first = time.perf_counter()
        return first, count

    start = time.perf_counter()
    results = await asyncio.gather(*(one(i) for i in range(streams)))
    end = time.perf_counter()
    first = min(r[0] for r in results)
    return end - start, end - first, sum(r[1] for r in results)


def generate_run(model: torch.nn.Module, input_ids: torch.Tensor, tokens: int) -> tuple[float, int]:
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(  # type: ignore[operator]
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,  # generate's way to ignore EOS
            do_sample=False,
        )
    return time.perf_counter() - start, out.shape[1] - input_ids.shape[1]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=4, help="also measure N concurrent streams")
    args = parser.parse_args()

    engine = create_engine(default_model_specs()[0], EngineOptions())
    started = time.perf_counter()
    await engine.start()
    print(f"engine start (load + warm-up): {time.perf_counter() - started:.1f}s")
    loaded = engine._loaded  # type: ignore[attr-defined]
    input_ids = torch.tensor([await engine.tokenize(PROMPT)])

    best_engine = best_engine_decode = best_generate = float("inf")
    for _ in range(args.rounds):
        total, decode, n = await engine_run(engine, args.tokens)
        assert n == args.tokens
        best_engine = min(best_engine, total)
        best_engine_decode = min(best_engine_decode, decode / (n - 1))
        elapsed, m = await asyncio.to_thread(generate_run, loaded.model, input_ids, args.tokens)
        assert m == args.tokens
        best_generate = min(best_generate, elapsed)
    total, _, n = await engine_run(engine, args.tokens, args.streams)
    await engine.stop()

    engine_tps = args.tokens / best_engine
    generate_tps = args.tokens / best_generate
    print(f"prompt {input_ids.shape[1]} tokens, {args.tokens} new tokens, greedy, ignore_eos")
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")
    print(f"model.generate : {generate_tps:6.1f} tok/s (best of {args.rounds})")
    print(f"engine         : {engine_tps:6.1f} tok/s ({engine_tps / generate_tps:.2f}x generate)")
    print(f"engine decode  : {1 / best_engine_decode:6.1f} tok/s after the first token")
    print(f"engine x{args.streams}      : {n / total:6.1f} tok/s aggregate over concurrent streams")


if __name__ == "__main__":
    asyncio.run(main())
