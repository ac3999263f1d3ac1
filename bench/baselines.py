"""Raw in-process baselines: HF `model.generate` on the default chat model, loaded as the worker
loads it (float32, SDPA, the worker's --quantization), single stream and on a left-padded static
batch, greedy with a fixed output length. Run while no service is busy: the machine has only a
few cores."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.worker.engine.loading import ModelKind, resolve_quantization

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

STATIC_BATCH_SIZE = 16


@dataclass(frozen=True)
class Baselines:
    model_path: str
    threads: int  # torch intra-op threads of this process
    quantization: str  # the weights generate ran on: "none", "int8" or "bf16" (resolved)
    prompt_tokens: tuple[int, ...]  # per prompt of the set, as the worker tokenizes it
    # One greedy generate per prompt of the set, one after the other.
    single_requests: int
    single_seconds: float
    single_tok_s: float
    # One generate over STATIC_BATCH_SIZE prompts (the set repeated), left-padded.
    batch_size: int
    batch_seconds: float
    batch_tok_s: float


def measure_baselines(
    model_path: str,
    prompts: Sequence[str],
    max_tokens: int,
    quantization: str = "none",
    batch_size: int = STATIC_BATCH_SIZE,
) -> Baselines:
    """Load the model, warm it up, then time single-stream and static-batch generation."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()  # generate's notes on unused sampling flags
    transformers.logging.disable_progress_bar()  # loading bars would flood the report
    model, tokenizer = _load(Path(model_path))
    # Resolved as the worker resolves it ("auto": bf16 with AMX, int8 with VNNI, else none).
    quantization = resolve_quantization(quantization, model.device, ModelKind.CAUSAL_LM)
    if quantization != "none":
        from services.worker.engine.quantization import quantize

        quantize(model, quantization)
    encoded = [list(tokenizer.encode(p, add_special_tokens=True)) for p in prompts]
    batch_prompts = [prompts[i % len(prompts)] for i in range(batch_size)]
    with torch.inference_mode():
        _generate(model, tokenizer, [encoded[0]], 4)  # first-call costs out of the measurement
        started = time.perf_counter()
        for ids in encoded:
            _generate(model, tokenizer, [ids], max_tokens)
        single_seconds = time.perf_counter() - started

        batch = _left_padded(tokenizer, batch_prompts)
        _generate_padded(model, tokenizer, batch, 4)
        started = time.perf_counter()
        _generate_padded(model, tokenizer, batch, max_tokens)
        batch_seconds = time.perf_counter() - started
    return Baselines(
        model_path=model_path,
        threads=torch.get_num_threads(),
        quantization=quantization,
        prompt_tokens=tuple(len(ids) for ids in encoded),
        single_requests=len(encoded),
        single_seconds=single_seconds,
        single_tok_s=len(encoded) * max_tokens / single_seconds,
        batch_size=batch_size,
        batch_seconds=batch_seconds,
        batch_tok_s=batch_size * max_tokens / batch_seconds,
    )


def _load(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, kwargs = (path.parent, {"gguf_file": path.name}) if path.is_file() else (path, {})
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="sdpa", **kwargs
    )
    model.eval()
    logger.info("baseline model loaded in %.1fs", time.perf_counter() - started)
    return model, tokenizer


def _left_padded(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> dict[str, Any]:
    tokenizer.padding_side = "left"  # decoder-only: new tokens must follow every prompt directly
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return dict(tokenizer(list(prompts), padding=True, return_tensors="pt"))


def _generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, ids: list[list[int]], tokens: int
) -> None:
    import torch

    input_ids = torch.tensor(ids)
    _generate_padded(
        model,
        tokenizer,
        {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)},
        tokens,
    )


def _generate_padded(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    inputs: dict[str, torch.Tensor],
    tokens: int,
) -> None:
    prompt_length = inputs["input_ids"].shape[1]
    pad_token_id = tokenizer.pad_token_id
    if pad_token_id is None:
        pad_token_id = tokenizer.eos_token_id
    out = model.generate(  # type: ignore[operator]
        **inputs,
        max_new_tokens=tokens,
        min_new_tokens=tokens,  # generate's way to ignore EOS: the same work as ignore_eos
        do_sample=False,
        pad_token_id=pad_token_id,
    )
    generated = out.shape[1] - prompt_length
    if generated != tokens:
        raise RuntimeError(f"generate produced {generated} tokens instead of {tokens}")
