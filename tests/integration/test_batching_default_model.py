"""Continuous batching on the default model: every request of a mixed batch (different prompt
lengths, joining at different steps, prompts prefilled in chunks) gets exactly the tokens
transformers' own generate gives it alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from services.worker.default_models import default_model_specs
from services.worker.engine.factory import create_engine
from services.worker.engine.interface import GenerationRequest, SamplingParams, StoppingParams
from services.worker.engine.loading import EngineOptions

pytestmark = pytest.mark.integration

NEW_TOKENS = 24
TEXTS = (
    "Hi",
    "Write a story about a lighthouse keeper who finds a message in a bottle on the rocks below.",
    "Explain, step by step and with examples, how a steam engine turns heat into motion. " * 6,
    "List three colours.",
)


@pytest.fixture(scope="module")
def chat_model() -> tuple[PreTrainedModel, list[list[int]]]:
    spec = default_model_specs()[0]
    path = Path(spec.path)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    prompts = [tokenizer.encode(text) for text in TEXTS]
    return model, prompts


def generate_alone(model: PreTrainedModel, prompt: list[int]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    return out[0, len(prompt) :].tolist()


# 48: the long prompt is prefilled in chunks between the others' decodes.
@pytest.mark.parametrize("max_batch_tokens", [48, 512])
async def test_mixed_batch_equals_generate_alone(
    chat_model: tuple[PreTrainedModel, list[list[int]]], max_batch_tokens: int
) -> None:
    model, prompts = chat_model
    expected = [generate_alone(model, prompt) for prompt in prompts]

    options = EngineOptions(max_running=4, max_batch_tokens=max_batch_tokens)
    engine = create_engine(default_model_specs()[0], options)
    await engine.start()
    try:
        first_tokens = asyncio.Event()

        async def run(index: int) -> list[int]:
            request = GenerationRequest(
                request_id=f"r{index}",
                prompt=prompts[index],
                sampling=SamplingParams(temperature=0.0),
                stopping=StoppingParams(max_tokens=NEW_TOKENS),
            )
            tokens: list[int] = []
            async for chunk in engine.generate(request):
                tokens.extend(chunk.token_ids)
                if len(tokens) >= 3:
                    first_tokens.set()
            return tokens

        first = asyncio.create_task(run(0))
        await first_tokens.wait()  # the others join while the first is mid-generation
        rest = [asyncio.create_task(run(i)) for i in range(1, len(prompts))]
        results = await asyncio.gather(first, *rest)
    finally:
        await engine.stop()
    assert results == expected


@pytest.mark.parametrize("quantization", ["auto", "int4"])
async def test_the_served_default_mode_is_batch_invariant_and_cache_exact(
    chat_model: tuple[PreTrainedModel, list[list[int]]], quantization: str
) -> None:
    """The worker's default, `--quantization auto` (bf16 on an AMX CPU, else int8 or none), and
    int4 are approximate against float32 generate, but a request's greedy answer is the same in a
    mixed batch as alone, and the same when its prompt is served from the prefix cache."""
    _, prompts = chat_model
    engine = create_engine(
        default_model_specs()[0],
        EngineOptions(max_running=4, max_batch_tokens=48, quantization=quantization),
    )
    await engine.start()

    async def run(index: int) -> list[int]:
        request = GenerationRequest(
            request_id=f"auto{index}-{asyncio.get_running_loop().time()}",
            prompt=prompts[index],
            sampling=SamplingParams(temperature=0.0),
            stopping=StoppingParams(max_tokens=NEW_TOKENS, ignore_eos=True),
        )
        tokens: list[int] = []
        async for chunk in engine.generate(request):
            tokens.extend(chunk.token_ids)
        return tokens

    try:
        together = await asyncio.gather(*(run(i) for i in range(len(prompts))))
        # Alone, one after the other: each prompt's full blocks now come from the cache.
        alone = [await run(i) for i in range(len(prompts))]
        assert engine.stats().prefix_cache_hit_tokens > 0
    finally:
        await engine.stop()
    assert together == alone
