"""Translation between the OpenAI request and response models and chatfleet.v1 protobuf messages,
shared by chat completions, completions and the Responses API: roles and conversations, sampling
and stopping, per-choice Generate requests, finish reasons, and the worker's answers accumulated
into OpenAI choices, usage and logprobs.

Tools and tool choices are translated by tools.py, output constraints (response_format,
structured_outputs, guided_*, the Responses API's text.format) by structured.py; both are used by
chat and the Responses API alike.

Finish reasons: STOP -> "stop", LENGTH -> "length", TOOL_CALLS -> "tool_calls", CANCELLED (the
worker gave up on the request, e.g. while draining) -> "abort" as vLLM reports it, so a cut-short
answer never passes for a finished one.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

import grpc

from chatfleet.v1 import worker_pb2
from services.common.errors import InvalidRequestError
from services.common.grpc_errors import field_of
from services.common.limits import LOGIT_BIAS_MAX, LOGIT_BIAS_MIN
from services.gateway.protocol import (
    UINT32_MAX,
    ChatCompletionRequest,
    ChatLogprobs,
    ChatMessage,
    ChatMessageParam,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionLogprobs,
    DeltaToolCall,
    PromptTokensDetails,
    SamplingExtras,
    UsageInfo,
)
from services.gateway.structured import WORKER_CONSTRAINT_PARAM, Constraint
from services.gateway.tools import ChatTools, ToolCallAssembler

# OpenAI roles -> the worker's ("developer" is OpenAI's new name for "system"); chat and the
# Responses API both translate with it.
ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}
# The worker's finish reasons -> OpenAI's (see the module docstring); the Responses API's status
# and the gateway's metrics are derived from these.
FINISH_REASONS = {
    worker_pb2.FINISH_REASON_STOP: "stop",
    worker_pb2.FINISH_REASON_LENGTH: "length",
    worker_pb2.FINISH_REASON_CANCELLED: "abort",
    worker_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}


def finish_reason(code: int) -> str:
    """OpenAI's finish reason for the worker's; a stream that ended without a final message
    (never expected) counts as finished."""
    return FINISH_REASONS.get(code, "stop")


def unsupported(param: str, what: str) -> InvalidRequestError:
    """The 400 for a field OpenAI defines and chatfleet cannot honour."""
    return InvalidRequestError(f"'{param}' is not supported by chatfleet: {what}.", param=param)


# --- requests ------------------------------------------------------------------------------------


def chat_messages(messages: Sequence[ChatMessageParam]) -> list[worker_pb2.ChatMessage]:
    """The conversation for the worker. A legacy assistant `function_call` gets an id of its own,
    which the "function" turn after it answers."""
    converted = []
    legacy_call_id = ""
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        turn = worker_pb2.ChatMessage(role=ROLES[message.role], name=message.name or "")
        if message.role == "tool":
            if not message.tool_call_id:
                raise InvalidRequestError(
                    "A tool message needs the 'tool_call_id' of the call it answers.",
                    param=f"{where}.tool_call_id",
                )
            turn.tool_call_id = message.tool_call_id
        elif message.role == "function":
            if not message.name:
                raise InvalidRequestError(
                    "A function message needs the 'name' of the function that produced it.",
                    param=f"{where}.name",
                )
            turn.tool_call_id = legacy_call_id
        elif message.tool_calls or message.function_call is not None:
            if message.role != "assistant":
                param = "tool_calls" if message.tool_calls else "function_call"
                raise InvalidRequestError(
                    "Only assistant messages carry tool calls.", param=f"{where}.{param}"
                )
            for call in message.tool_calls or ():
                turn.tool_calls.add(
                    id=call.id, name=call.function.name, arguments=call.function.arguments
                )
            if message.function_call is not None:
                legacy_call_id = f"call_{i}"
                turn.tool_calls.add(
                    id=legacy_call_id,
                    name=message.function_call.name,
                    arguments=message.function_call.arguments,
                )
        calls_tools = bool(turn.tool_calls)
        turn.content = _message_text(message, where, may_be_null=calls_tools)
        converted.append(turn)
    return converted


def _message_text(message: ChatMessageParam, where: str, *, may_be_null: bool) -> str:
    content = message.content
    if content is None:
        if may_be_null:
            return ""
        raise InvalidRequestError(
            f"'{where}.content' must be a string or a list of text parts.",
            param=f"{where}.content",
        )
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type != "text":
            raise InvalidRequestError(
                f"Content parts of type {part.type!r} are not supported: only 'text' parts are.",
                param=f"{where}.content[{j}].type",
            )
        if part.text is None:
            raise InvalidRequestError(
                "A text part needs a 'text' string.", param=f"{where}.content[{j}].text"
            )
        texts.append(part.text)
    return "\n".join(texts)


def conversation(request: ChatCompletionRequest, tools: ChatTools) -> worker_pb2.ChatMessages:
    """A chat request's messages, tools and chat template variables."""
    chat = worker_pb2.ChatMessages(
        messages=chat_messages(request.messages), tools=tools.definitions
    )
    if request.chat_template_kwargs:
        chat.template_kwargs.update(request.chat_template_kwargs)
    return chat


def constrain(
    request: worker_pb2.GenerateRequest, constraint: Constraint | None, tools: ChatTools | None
) -> None:
    """Set the request's output constraint, refused next to a forced tool call."""
    if constraint is None:
        return
    if tools is not None and tools.forced:
        # The worker forces the call with a grammar of its own: there is room for one.
        raise InvalidRequestError(
            f"'{constraint.param}' cannot be combined with a forced tool call "
            f"('{tools.choice_param}' required or naming a function).",
            param=constraint.param,
        )
    request.constraint.CopyFrom(constraint.proto)


def logit_bias(value: Mapping[str, object] | None) -> dict[int, float]:
    """OpenAI's logit_bias (token ids as strings of digits) as the worker's map."""
    bias: dict[int, float] = {}
    for key, amount in (value or {}).items():
        if not (key.isascii() and key.isdigit() and int(key) <= UINT32_MAX):
            raise InvalidRequestError(
                f"'logit_bias' keys must be token ids (strings of digits), got {key!r}.",
                param="logit_bias",
            )
        if (
            isinstance(amount, bool)
            or not isinstance(amount, int | float)
            or not LOGIT_BIAS_MIN <= amount <= LOGIT_BIAS_MAX
        ):
            raise InvalidRequestError(
                f"'logit_bias' values must be numbers in [{LOGIT_BIAS_MIN:g}, "
                f"{LOGIT_BIAS_MAX:g}], got {amount!r} for {key}.",
                param="logit_bias",
            )
        bias[int(key)] = float(amount)
    return bias


def sampling(request: SamplingExtras, seed_offset: int) -> worker_pb2.SamplingParams:
    """The sampling parameters of one choice: choice i of a seeded request samples with seed+i."""
    params = worker_pb2.SamplingParams()
    if request.temperature is not None:
        params.temperature = request.temperature
    if request.top_p is not None:
        params.top_p = request.top_p
    if request.top_k is not None and request.top_k > 0:
        params.top_k = request.top_k
    if request.min_p is not None:
        params.min_p = request.min_p
    if request.repetition_penalty is not None:
        params.repetition_penalty = request.repetition_penalty
    if request.presence_penalty is not None:
        params.presence_penalty = request.presence_penalty
    if request.frequency_penalty is not None:
        params.frequency_penalty = request.frequency_penalty
    if request.seed is not None:
        params.seed = (request.seed + seed_offset) % 2**64
    params.logit_bias.update(logit_bias(request.logit_bias))
    return params


def stopping(request: SamplingExtras, max_tokens: int | None) -> worker_pb2.StoppingCriteria:
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or ())
    criteria = worker_pb2.StoppingCriteria(
        min_tokens=request.min_tokens or 0,
        # An empty stop string would end every answer at once; OpenAI ignores it too.
        stop=[text for text in stop if text],
        stop_token_ids=request.stop_token_ids or [],
        ignore_eos=bool(request.ignore_eos),
    )
    if max_tokens is not None:
        criteria.max_tokens = max_tokens
    return criteria


def choice_request(
    base: worker_pb2.GenerateRequest,
    request: SamplingExtras,
    request_id: str,
    *,
    index: int,
    seed_offset: int,
    many: bool,
) -> worker_pb2.GenerateRequest:
    """The Generate call of one choice: `base` with the choice's request id and sampling."""
    call = worker_pb2.GenerateRequest()
    call.CopyFrom(base)
    # Each call of a request gets its own id, so the worker's log records tell its choices apart.
    call.request_id = f"{request_id}-{index}" if many else request_id
    call.sampling.CopyFrom(sampling(request, seed_offset))
    return call


def worker_param_renames(constraint: Constraint | None, tools: ChatTools | None) -> dict[str, str]:
    """The worker names the constraint it could not compile "constraint": the client knows it by
    the field it used (or by its tools, whose schemas force a required or named call)."""
    if constraint is not None:
        return {WORKER_CONSTRAINT_PARAM: constraint.param}
    if tools is not None and tools.forced:
        return {WORKER_CONSTRAINT_PARAM: tools.definitions_param}
    return {}


def with_client_params(
    stream: AsyncGenerator[worker_pb2.GenerateResponse, None], renames: Mapping[str, str]
) -> AsyncGenerator[worker_pb2.GenerateResponse, None]:
    """`stream`, its INVALID_ARGUMENT errors on a worker parameter in `renames` reported on the
    client's field instead."""
    return _renaming_params(stream, renames) if renames else stream


async def _renaming_params(
    stream: AsyncGenerator[worker_pb2.GenerateResponse, None], renames: Mapping[str, str]
) -> AsyncGenerator[worker_pb2.GenerateResponse, None]:
    async with aclosing(stream):
        try:
            async for message in stream:
                yield message
        except grpc.aio.AioRpcError as error:
            param = field_of(error) if error.code() == grpc.StatusCode.INVALID_ARGUMENT else None
            if param is None or param not in renames:
                raise
            raise InvalidRequestError(error.details() or "", param=renames[param]) from None


# --- answers -------------------------------------------------------------------------------------


@dataclass
class GeneratedChoice:
    """What one Generate stream has produced so far."""

    echo_parts: list[str] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)
    reasoning_parts: list[str] = field(default_factory=list)
    tool_calls: ToolCallAssembler = field(default_factory=ToolCallAssembler)
    echo_logprobs: list[worker_pb2.TokenLogprob] = field(default_factory=list)
    logprobs: list[worker_pb2.TokenLogprob] = field(default_factory=list)
    finish: int = worker_pb2.FINISH_REASON_UNSPECIFIED
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    text_length: int = 0

    def add(self, message: worker_pb2.GenerateResponse) -> list[DeltaToolCall]:
        """Take in one message; returns its tool-call pieces in OpenAI's streamed shape."""
        if message.is_prompt_echo:
            self.echo_parts.append(message.text)
            self.echo_logprobs.extend(message.logprobs)
        else:
            self.parts.append(message.text)
            self.logprobs.extend(message.logprobs)
        self.text_length += len(message.text)
        if message.finish_reason:
            self.finish = message.finish_reason
            self.prompt_tokens = message.usage.prompt_tokens
            self.cached_tokens = message.cached_prompt_tokens
            self.completion_tokens = message.usage.completion_tokens
        self.reasoning_parts.append(message.reasoning_text)
        return self.tool_calls.add(message.tool_calls)

    def text(self) -> str:
        return "".join(self.echo_parts) + "".join(self.parts)

    def chat_message(self) -> ChatMessage:
        """The whole answer; content is null when the model only called tools."""
        calls = self.tool_calls.tool_calls()
        text = self.text()
        return ChatMessage(
            content=text if text or calls is None else None,
            tool_calls=calls,
            reasoning_content="".join(self.reasoning_parts) or None,
        )

    def legacy_logprobs(self) -> CompletionLogprobs:
        """The echoed prompt's logprobs (when the worker sent them) then the completion's, whose
        offsets start after the echoed text either way."""
        echo = legacy_logprobs(self.echo_logprobs, 0)
        completion = legacy_logprobs(self.logprobs, len("".join(self.echo_parts)))
        return CompletionLogprobs(
            tokens=echo.tokens + completion.tokens,
            token_logprobs=echo.token_logprobs + completion.token_logprobs,
            top_logprobs=echo.top_logprobs + completion.top_logprobs,
            text_offset=echo.text_offset + completion.text_offset,
        )

    def finish_reason(self) -> str:
        return finish_reason(self.finish)


def usage(choices: Sequence[GeneratedChoice], *, prompts: Sequence[GeneratedChoice]) -> UsageInfo:
    """Prompt tokens count once per prompt (`prompts` holds one choice of each), completion
    tokens once per choice."""
    prompt_tokens = sum(choice.prompt_tokens for choice in prompts)
    completion_tokens = sum(choice.completion_tokens for choice in choices)
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(
            cached_tokens=sum(choice.cached_tokens for choice in prompts)
        ),
    )


def _utf8(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(entries: Sequence[worker_pb2.TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=entry.token,
                logprob=entry.logprob,
                bytes=_utf8(entry.token),
                top_logprobs=[
                    ChatTopLogprob(token=top.token, logprob=top.logprob, bytes=_utf8(top.token))
                    for top in entry.top_logprobs
                ],
            )
            for entry in entries
        ]
    )


def legacy_logprobs(entries: Sequence[worker_pb2.TokenLogprob], offset: int) -> CompletionLogprobs:
    """Legacy completions logprobs; `offset` is where the first token starts in the choice's text.

    An echoed prompt's first token has no logprob: the worker sends NaN, reported as null."""
    logprobs = CompletionLogprobs()
    for entry in entries:
        known = not math.isnan(entry.logprob)
        logprobs.tokens.append(entry.token)
        logprobs.token_logprobs.append(entry.logprob if known else None)
        top = {alt.token: alt.logprob for alt in entry.top_logprobs}
        logprobs.top_logprobs.append(top if known else None)
        logprobs.text_offset.append(offset)
        offset += len(entry.token)
    return logprobs
