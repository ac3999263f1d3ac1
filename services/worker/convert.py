"""Conversion between the worker's protobuf messages and the engine's dataclasses, in one place.

Checks here cover what protobuf cannot express (ranges, required oneofs); an error names the faulty
field with its OpenAI parameter name so the gateway can pass it on.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence

from google.protobuf.message import Message

from chatfleet.v1 import common_pb2, worker_pb2
from services.common.errors import InvalidRequestError
from services.worker.engine import (
    ChatMessage,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    LoadInfo,
    ModelDescription,
    Prompt,
    SamplingParams,
    StoppingParams,
)

CHAT_ROLES = frozenset({"system", "user", "assistant"})
MAX_TOP_LOGPROBS = 20
# Sampling divides logits by the temperature and positive logits by the repetition penalty: tiny
# divisors overflow float32 to inf, and the NaN probabilities that follow fail the whole engine
# step. Temperatures below this decode greedily, as vLLM does; smaller penalties are refused
# (2**-7: exact in float32, so the gateway's bound of 0.01 still passes once rounded to float32).
GREEDY_BELOW_TEMPERATURE = 1e-5
MIN_REPETITION_PENALTY = 2**-7

_FINISH_REASONS = {
    None: worker_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: worker_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: worker_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: worker_pb2.FINISH_REASON_CANCELLED,
}


def to_generation_request(
    request: worker_pb2.GenerateRequest, defaults: SamplingParams | None = None
) -> GenerationRequest:
    """Validate a GenerateRequest and turn it into the engine's GenerationRequest."""
    which = request.WhichOneof("prompt")
    prompt: Prompt
    if which == "text":
        if not request.text:
            raise InvalidRequestError("the prompt must not be empty", param="prompt")
        prompt = request.text
    elif which == "chat":
        prompt = to_chat_messages(request.chat)
    elif which == "token_ids":
        if not request.token_ids.ids:
            raise InvalidRequestError("the prompt must contain at least one token", param="prompt")
        prompt = list(request.token_ids.ids)
    else:
        raise InvalidRequestError("a prompt (text, chat or token_ids) is required", param="prompt")
    return GenerationRequest(
        request_id=request.request_id or uuid.uuid4().hex,
        prompt=prompt,
        sampling=_sampling(request.sampling, defaults or SamplingParams()),
        stopping=_stopping(request.stopping),
        logprobs=_logprobs(request.logprobs),
        echo=request.echo,
    )


def to_chat_messages(chat: worker_pb2.ChatMessages) -> list[ChatMessage]:
    """The turns of a conversation; at least one, each with a known role."""
    if not chat.messages:
        raise InvalidRequestError("'messages' must contain at least one message", param="messages")
    for index, message in enumerate(chat.messages):
        if message.role not in CHAT_ROLES:
            raise InvalidRequestError(
                f"messages[{index}].role must be one of {', '.join(sorted(CHAT_ROLES))}, "
                f"got {message.role!r}",
                param="messages",
            )
    return [ChatMessage(role=m.role, content=m.content) for m in chat.messages]


def to_tokenize_prompt(request: worker_pb2.TokenizeRequest) -> str | list[ChatMessage]:
    """What a TokenizeRequest asks to tokenize: text (possibly empty) or a conversation."""
    which = request.WhichOneof("input")
    if which == "text":
        return request.text
    if which == "chat":
        return to_chat_messages(request.chat)
    raise InvalidRequestError("an input (text or chat) is required", param="prompt")


def to_embed_inputs(request: worker_pb2.EmbedRequest) -> list[str]:
    """The texts to embed: at least one, none empty."""
    if not request.inputs:
        raise InvalidRequestError("'input' must contain at least one text", param="input")
    for index, text in enumerate(request.inputs):
        if not text:
            raise InvalidRequestError(f"input[{index}] must not be empty", param="input")
    return list(request.inputs)


def to_generate_response(chunk: GenerationChunk) -> worker_pb2.GenerateResponse:
    """One streamed message; usage is set on the last one only."""
    response = worker_pb2.GenerateResponse(
        text=chunk.text,
        token_ids=chunk.token_ids,
        logprobs=[
            worker_pb2.TokenLogprob(
                token_id=lp.token_id,
                token=lp.token,
                logprob=lp.logprob,
                top_logprobs=[
                    worker_pb2.TopLogprob(token_id=t.token_id, token=t.token, logprob=t.logprob)
                    for t in lp.top
                ],
            )
            for lp in chunk.logprobs
        ],
        finish_reason=_FINISH_REASONS[chunk.finish_reason],
        is_prompt_echo=chunk.is_prompt_echo,
        stop_reason=chunk.stop_reason,
    )
    if chunk.finish_reason is not None:
        response.usage.CopyFrom(
            worker_pb2.Usage(
                prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens
            )
        )
    return response


def to_embed_response(vectors: Sequence[Sequence[float]], tokens: int) -> worker_pb2.EmbedResponse:
    return worker_pb2.EmbedResponse(
        embeddings=[worker_pb2.Embedding(values=vector) for vector in vectors],
        prompt_tokens=tokens,
    )


def to_model_info(description: ModelDescription) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(
        name=description.name,
        kind=(
            common_pb2.MODEL_KIND_GENERATE
            if description.supports_generate
            else common_pb2.MODEL_KIND_EMBED
        ),
        context_length=description.context_length,
        supports_chat=description.supports_chat,
        supports_embeddings=description.supports_embeddings,
        aliases=list(description.aliases),
        source=description.source,
    )


def to_load(load: LoadInfo) -> common_pb2.Load:
    return common_pb2.Load(running=load.running, waiting=load.waiting, capacity=load.capacity)


def _sampling(params: worker_pb2.SamplingParams, defaults: SamplingParams) -> SamplingParams:
    """Fields the request leaves unset take the model's defaults."""
    temperature = _optional(params, "temperature", defaults.temperature)
    top_p = _optional(params, "top_p", defaults.top_p)
    min_p = _optional(params, "min_p", defaults.min_p)
    repetition = _optional(params, "repetition_penalty", defaults.repetition_penalty)
    presence = _optional(params, "presence_penalty", defaults.presence_penalty)
    frequency = _optional(params, "frequency_penalty", defaults.frequency_penalty)
    # Comparisons with NaN are false, so NaN fails every range check below.
    _check(0 <= temperature < math.inf, "temperature", f"must be a number >= 0, got {temperature}")
    _check(0 < top_p <= 1, "top_p", f"must be in (0, 1], got {top_p}")
    _check(0 <= min_p <= 1, "min_p", f"must be in [0, 1], got {min_p}")
    _check(
        MIN_REPETITION_PENALTY <= repetition < math.inf,
        "repetition_penalty",
        f"must be a number >= {MIN_REPETITION_PENALTY}, got {repetition}",
    )
    _check(-2 <= presence <= 2, "presence_penalty", f"must be in [-2, 2], got {presence}")
    _check(-2 <= frequency <= 2, "frequency_penalty", f"must be in [-2, 2], got {frequency}")
    if temperature < GREEDY_BELOW_TEMPERATURE:
        temperature = 0.0
    return SamplingParams(
        temperature=temperature,
        top_p=top_p,
        top_k=params.top_k if params.HasField("top_k") else defaults.top_k,
        min_p=min_p,
        repetition_penalty=repetition,
        presence_penalty=presence,
        frequency_penalty=frequency,
        seed=params.seed if params.HasField("seed") else defaults.seed,
    )


def _stopping(criteria: worker_pb2.StoppingCriteria) -> StoppingParams:
    max_tokens = criteria.max_tokens if criteria.HasField("max_tokens") else None
    if max_tokens is not None:
        _check(max_tokens >= 1, "max_tokens", f"must be at least 1, got {max_tokens}")
        _check(
            criteria.min_tokens <= max_tokens,
            "min_tokens",
            f"must not exceed max_tokens ({max_tokens}), got {criteria.min_tokens}",
        )
    _check(all(criteria.stop), "stop", "stop strings must not be empty")
    return StoppingParams(
        max_tokens=max_tokens,
        min_tokens=criteria.min_tokens,
        stop=tuple(criteria.stop),
        stop_token_ids=tuple(criteria.stop_token_ids),
        ignore_eos=criteria.ignore_eos,
    )


def _logprobs(params: worker_pb2.LogprobsParams) -> int | None:
    if not params.enabled:
        _check(params.top_logprobs == 0, "top_logprobs", "requires logprobs to be enabled")
        return None
    _check(
        params.top_logprobs <= MAX_TOP_LOGPROBS,
        "top_logprobs",
        f"must be at most {MAX_TOP_LOGPROBS}, got {params.top_logprobs}",
    )
    return params.top_logprobs


def _optional(message: Message, name: str, default: float) -> float:
    """A proto3 `optional` float field, or `default` when unset."""
    return float(getattr(message, name)) if message.HasField(name) else default


def _check(ok: bool, param: str, problem: str) -> None:
    if not ok:
        raise InvalidRequestError(f"'{param}' {problem}", param=param)
