"""The one home of a generation request's range checks: sampling parameters, stopping criteria,
logprobs and logit_bias.

Both entries call these: the worker's protobuf conversion (services/worker/convert.py) before a
request reaches an engine, and the engine itself (callers such as the benchmarks reach it
directly). A failed check raises InvalidRequestError naming the OpenAI parameter at fault; the gRPC
edge maps it to INVALID_ARGUMENT. Comparisons are written so that NaN fails them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from services.common.errors import InvalidRequestError
from services.common.limits import LOGIT_BIAS_MAX, LOGIT_BIAS_MIN, MAX_TOP_LOGPROBS
from services.worker.engine.interface import GenerationRequest, SamplingParams, StoppingParams

# Sampling divides logits by the temperature and positive logits by the repetition penalty: tiny
# divisors overflow float32 to inf, and the NaN probabilities that follow fail the whole engine
# step. Temperatures below this decode greedily, as vLLM does; smaller penalties are refused
# (2**-7: exact in float32, so the gateway's bound of 0.01 still passes once rounded to float32).
GREEDY_BELOW_TEMPERATURE = 1e-5
MIN_REPETITION_PENALTY = 2**-7
# presence_penalty and frequency_penalty, as OpenAI bounds them.
MIN_PENALTY, MAX_PENALTY = -2.0, 2.0


def validate_request(request: GenerationRequest, vocab_size: int) -> None:
    """Every range check of a request, token ids against the model's vocabulary included."""
    validate_sampling(request.sampling)
    validate_stopping(request.stopping, echo=request.echo, vocab_size=vocab_size)
    validate_top_logprobs(request.logprobs)
    validate_logit_bias(request.logit_bias, vocab_size)


def validate_sampling(params: SamplingParams) -> None:
    """Raise InvalidRequestError naming the first out-of-range parameter."""

    def check(ok: bool, param: str, rule: str, value: float) -> None:
        if not ok:
            raise InvalidRequestError(f"{param} must be {rule}, got {value}", param=param)

    p = params
    check(0 <= p.temperature < math.inf, "temperature", "a number >= 0", p.temperature)
    check(0 < p.top_p <= 1, "top_p", "in (0, 1]", p.top_p)
    check(p.top_k >= 0, "top_k", ">= 0 (0 disables it)", p.top_k)
    check(0 <= p.min_p <= 1, "min_p", "in [0, 1]", p.min_p)
    check(
        MIN_REPETITION_PENALTY <= p.repetition_penalty < math.inf,
        "repetition_penalty",
        f"a number >= {MIN_REPETITION_PENALTY}",
        p.repetition_penalty,
    )
    penalties = f"in [{MIN_PENALTY:g}, {MAX_PENALTY:g}]"
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(p, name)
        check(MIN_PENALTY <= value <= MAX_PENALTY, name, penalties, value)


def greedy_if_tiny(params: SamplingParams) -> SamplingParams:
    """`params` with a temperature below GREEDY_BELOW_TEMPERATURE turned into greedy decoding."""
    if 0 < params.temperature < GREEDY_BELOW_TEMPERATURE:
        return dataclasses.replace(params, temperature=0.0)
    return params


def validate_stopping(
    stopping: StoppingParams, *, echo: bool, vocab_size: int | None = None
) -> None:
    """max_tokens at least 1 (0 scores an echoed prompt and generates nothing: the completions
    API's echo), min_tokens within it, no empty stop string; with `vocab_size`, stop token ids
    in the vocabulary."""
    max_tokens, min_tokens = stopping.max_tokens, stopping.min_tokens
    if max_tokens is not None and max_tokens < 1 and (max_tokens < 0 or not echo):
        raise InvalidRequestError(
            f"max_tokens must be at least 1, got {max_tokens}"
            + ("" if max_tokens < 0 else " (0 is allowed only with echo)"),
            param="max_tokens",
        )
    if min_tokens < 0:
        raise InvalidRequestError(
            f"min_tokens must be 0 or more, got {min_tokens}", param="min_tokens"
        )
    if max_tokens is not None and min_tokens > max_tokens:
        raise InvalidRequestError(
            f"min_tokens ({min_tokens}) exceeds max_tokens ({max_tokens})", param="min_tokens"
        )
    if not all(stopping.stop):
        raise InvalidRequestError("stop strings must not be empty", param="stop")
    if vocab_size is not None:
        bad = next((t for t in stopping.stop_token_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(
                f"stop token id {bad} is out of the vocabulary (0..{vocab_size - 1})",
                param="stop_token_ids",
            )


def validate_top_logprobs(count: int | None, *, param: str = "logprobs") -> None:
    """Alternatives per position: None (no logprobs) or 0..MAX_TOP_LOGPROBS. `param` is the
    field's name where the caller spells it differently (the protobuf's top_logprobs)."""
    if count is not None and not 0 <= count <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(
            f"{param} must be between 0 and {MAX_TOP_LOGPROBS}, got {count}", param=param
        )


def validate_logit_bias(
    logit_bias: Sequence[tuple[int, float]], vocab_size: int | None = None
) -> None:
    """Biases within [LOGIT_BIAS_MIN, LOGIT_BIAS_MAX] (OpenAI's range); with `vocab_size`, token
    ids in the vocabulary."""
    for token_id, bias in logit_bias:
        if vocab_size is not None and not 0 <= token_id < vocab_size:
            raise InvalidRequestError(
                f"logit_bias token id {token_id} is out of the vocabulary (0..{vocab_size - 1})",
                param="logit_bias",
            )
        if not LOGIT_BIAS_MIN <= bias <= LOGIT_BIAS_MAX:
            raise InvalidRequestError(
                f"logit_bias values must be between {LOGIT_BIAS_MIN:g} and {LOGIT_BIAS_MAX:g}, "
                f"got {bias} for token {token_id}",
                param="logit_bias",
            )


def check_context(n_prompt: int, max_tokens: int | None, context: int, param: str) -> int:
    """The completion's token budget: max_tokens, or all the room the prompt leaves in the
    context window when unset. Refuses a prompt that fills the window, or a max_tokens that
    overflows it, in OpenAI's wording (clients and tools look for it). `param` names the prompt's
    field: "prompt" or "messages"."""
    where = "the messages" if param == "messages" else "the prompt"
    if n_prompt >= context:
        raise InvalidRequestError(
            f"This model's maximum context length is {context} tokens. However, {where} "
            f"resulted in {n_prompt} tokens, leaving no room for the completion. Please "
            f"reduce the length of {where}.",
            param=param,
        )
    room = context - n_prompt
    if max_tokens is not None and max_tokens > room:
        raise InvalidRequestError(
            f"This model's maximum context length is {context} tokens. However, you "
            f"requested {n_prompt + max_tokens} tokens ({n_prompt} in {where}, "
            f"{max_tokens} in the completion). Please reduce the length of {where} "
            "or completion.",
            param="max_tokens",
        )
    return room if max_tokens is None else max_tokens
