"""Handlers of the OpenAI routes: check a request, translate it to gRPC, call upstream, reply.

Choices: `n` (times each prompt) runs that many Generate calls concurrently, choice i with seed+i
when a seed is given. Finish reasons: STOP -> "stop", LENGTH -> "length", TOOL_CALLS ->
"tool_calls", CANCELLED (the worker gave up on the request, e.g. while draining) -> "abort" as vLLM
reports it, so a cut-short answer never passes for a finished one. Tools and tool turns are
translated by tools.py, output constraints (response_format, structured_outputs, guided_*) by
structured.py.

Streams are primed: the first upstream message is awaited before the HTTP response starts, so a
request that fails up front (unknown model, overload) gets a plain HTTP error; an error after that
is sent as an SSE `data: {"error": ...}` event then `data: [DONE]`.

Deadlines (RouteTimeouts, from the gateway's flags): a non-streamed completion, a model listing and
an embeddings request each get one budget for the whole request. A stream gets a budget for its
first token and, once tokens flow, an optional total cap (none by default), so a long answer that
keeps coming is not cut by a wall clock the client never asked for. Timeouts become 504.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import struct
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from pydantic import BaseModel

from chatfleet.v1 import worker_pb2
from services.common.errors import ChatfleetError, InvalidRequestError, ModelNotFoundError
from services.common.grpc_errors import field_of
from services.gateway.clients import Deadline, DeadlineExceededError, Metadata, Upstream
from services.gateway.config import GatewayConfig
from services.gateway.errors import APIError, to_api_error
from services.gateway.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatLogprobs,
    ChatMessage,
    ChatTokenLogprob,
    ChatTopLogprob,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionPrompt,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DeltaToolCall,
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SamplingExtras,
    UsageInfo,
)
from services.gateway.structured import WORKER_CONSTRAINT_PARAM, Constraint, output_constraint
from services.gateway.tools import ChatTools, ToolCallAssembler, chat_messages, chat_tools

logger = logging.getLogger(__name__)

T = TypeVar("T")

# OpenAI's default for the legacy completions endpoint (chat has no default: up to the context).
DEFAULT_COMPLETION_MAX_TOKENS = 16

_FINISH_REASONS = {
    worker_pb2.FINISH_REASON_STOP: "stop",
    worker_pb2.FINISH_REASON_LENGTH: "length",
    worker_pb2.FINISH_REASON_CANCELLED: "abort",
    worker_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
# logit_bias values OpenAI accepts.
MAX_LOGIT_BIAS = 100.0
_UINT32_MAX = 2**32 - 1

# Failures a handler reports to the client; anything else is a bug and becomes a 500.
HandledError = (APIError, ChatfleetError, grpc.aio.AioRpcError)


@dataclass(frozen=True)
class RequestContext:
    """What every upstream call of one HTTP request shares."""

    request_id: str
    deadline: Deadline

    @property
    def metadata(self) -> Metadata:
        return (("x-request-id", self.request_id),)


@dataclass(frozen=True)
class RouteTimeouts:
    """Seconds each kind of request may take (see the module docstring); stream=None: no cap."""

    embeddings: float = GatewayConfig.embeddings_timeout_seconds
    first_token: float = GatewayConfig.first_token_timeout_seconds
    stream: float | None = None

    @classmethod
    def from_config(cls, config: GatewayConfig) -> RouteTimeouts:
        return cls(
            embeddings=config.embeddings_timeout_seconds,
            first_token=config.first_token_timeout_seconds,
            stream=config.stream_timeout_seconds or None,
        )


@dataclass
class EventStream:
    """The SSE lines of a streamed answer. `close` releases the upstream calls even when the
    response never started iterating `events` (the client left before the first byte)."""

    events: AsyncIterator[str]
    close: Callable[[], Awaitable[None]]


class OpenAIServing:
    """The handlers behind the routes; one per app, holding the upstream clients."""

    def __init__(self, upstream: Upstream, timeouts: RouteTimeouts | None = None) -> None:
        self.upstream = upstream
        self.timeouts = timeouts or RouteTimeouts()

    async def health(self) -> bool:
        return await self.upstream.controller.is_serving()

    async def list_models(self, ctx: RequestContext) -> ModelList:
        models = await self.upstream.list_models(deadline=ctx.deadline, metadata=ctx.metadata)
        created = int(time.time())
        names = sorted({model.name for model in models})
        return ModelList(data=[ModelCard(id=name, created=created) for name in names])

    async def retrieve_model(self, name: str, ctx: RequestContext) -> ModelCard:
        for card in (await self.list_models(ctx)).data:
            if card.id == name:
                return card
        raise ModelNotFoundError(f"The model '{name}' does not exist.", param="model")

    # --- chat ------------------------------------------------------------------------------------

    async def create_chat_completion(
        self, request: ChatCompletionRequest, ctx: RequestContext
    ) -> ChatCompletionResponse | EventStream:
        _reject_unsupported_chat(request)
        n = request.n or 1
        tools = chat_tools(request)
        constraint = output_constraint(request)
        base = worker_pb2.GenerateRequest(
            model=request.model,
            chat=_conversation(request, tools),
            stopping=_stopping(request, request.max_completion_tokens or request.max_tokens),
        )
        if tools.choice is not None:
            base.tool_choice.CopyFrom(tools.choice)
        _constrain(base, constraint, tools)
        if request.logprobs:
            base.logprobs.enabled = True
            base.logprobs.top_logprobs = request.top_logprobs or 0
        deadline = self._generation_deadline(request.stream, ctx)
        renames = _worker_param_renames(constraint, tools)
        calls = [
            self._generate(
                base, request, ctx, deadline, index=i, seed_offset=i, many=n > 1, renames=renames
            )
            for i in range(n)
        ]
        merged = _merge(calls)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if request.stream:
            first = await _first(merged, self.timeouts.first_token)
            events = self._chat_events(request, response_id, created, n, first, merged)
            return EventStream(events, merged.aclose)

        choices = [_Choice() for _ in range(n)]
        async with aclosing(merged):
            async for index, message in merged:
                choices[index].add(message)
        return ChatCompletionResponse(
            id=response_id,
            created=created,
            model=request.model,
            choices=[
                ChatCompletionChoice(
                    index=i,
                    message=choice.chat_message(),
                    logprobs=_chat_logprobs(choice.logprobs) if request.logprobs else None,
                    finish_reason=choice.finish_reason(),
                )
                for i, choice in enumerate(choices)
            ],
            usage=_usage(choices, prompts=[choices[0]]),
        )

    async def _chat_events(
        self,
        request: ChatCompletionRequest,
        response_id: str,
        created: int,
        n: int,
        first: tuple[int, worker_pb2.GenerateResponse] | None,
        merged: AsyncGenerator[tuple[int, worker_pb2.GenerateResponse], None],
    ) -> AsyncGenerator[str, None]:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        has_tools = bool(request.tools or request.functions)

        def chunk(choices: list[ChatCompletionStreamChoice]) -> str:
            return _sse(
                ChatCompletionChunk(
                    id=response_id, created=created, model=request.model, choices=choices
                ),
                include_usage,
            )

        choices = [_Choice() for _ in range(n)]
        try:
            for i in range(n):
                # With tools the answer may be calls only, whose content stays null (as OpenAI's).
                delta = DeltaMessage(role="assistant", content=None if has_tools else "")
                yield chunk([ChatCompletionStreamChoice(index=i, delta=delta)])
            async for index, message in _chain(first, merged):
                tool_calls = choices[index].add(message)
                reasoning = message.reasoning_text or None
                if message.text or message.logprobs or reasoning or tool_calls:
                    # content "" only on a chunk that carries nothing else (logprobs alone).
                    text = message.text or (None if reasoning or tool_calls else "")
                    yield chunk(
                        [
                            ChatCompletionStreamChoice(
                                index=index,
                                delta=DeltaMessage(
                                    content=text,
                                    reasoning_content=reasoning,
                                    tool_calls=tool_calls or None,
                                ),
                                logprobs=_chat_logprobs(message.logprobs)
                                if request.logprobs
                                else None,
                            )
                        ]
                    )
                if message.finish_reason:
                    yield chunk(
                        [
                            ChatCompletionStreamChoice(
                                index=index,
                                delta=DeltaMessage(),
                                finish_reason=_FINISH_REASONS.get(message.finish_reason, "stop"),
                            )
                        ]
                    )
            if include_usage:
                final = ChatCompletionChunk(
                    id=response_id,
                    created=created,
                    model=request.model,
                    choices=[],
                    usage=_usage(choices, prompts=[choices[0]]),
                )
                yield _sse(final, include_usage)
        except HandledError as error:
            yield _sse_error(error)
        finally:
            await merged.aclose()
        yield "data: [DONE]\n\n"

    # --- completions -----------------------------------------------------------------------------

    async def create_completion(
        self, request: CompletionRequest, ctx: RequestContext
    ) -> CompletionResponse | EventStream:
        _reject_unsupported_completion(request)
        n = request.n or 1
        prompts = _completion_prompts(request.prompt)
        constraint = output_constraint(request)
        renames = _worker_param_renames(constraint, None)
        max_tokens = (
            DEFAULT_COMPLETION_MAX_TOKENS if request.max_tokens is None else request.max_tokens
        )
        deadline = self._generation_deadline(request.stream, ctx)
        calls = []
        for p, prompt in enumerate(prompts):
            base = worker_pb2.GenerateRequest(
                model=request.model,
                stopping=_stopping(request, max_tokens),
                echo=bool(request.echo),
            )
            if isinstance(prompt, str):
                base.text = prompt
            else:
                base.token_ids.ids.extend(prompt)
            if request.logprobs is not None:
                base.logprobs.enabled = True
                base.logprobs.top_logprobs = request.logprobs
                # Scoring a prompt (lm-eval's loglikelihood): its logprobs come with the echo.
                base.logprobs.prompt = bool(request.echo)
            _constrain(base, constraint, None)
            many = len(prompts) * n > 1
            for j in range(n):
                calls.append(
                    self._generate(
                        base,
                        request,
                        ctx,
                        deadline,
                        index=p * n + j,
                        seed_offset=j,
                        many=many,
                        renames=renames,
                    )
                )
        merged = _merge(calls)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if request.stream:
            first = await _first(merged, self.timeouts.first_token)
            events = self._completion_events(
                request, response_id, created, n, len(calls), first, merged
            )
            return EventStream(events, merged.aclose)

        choices = [_Choice() for _ in calls]
        async with aclosing(merged):
            async for index, message in merged:
                choices[index].add(message)
        return CompletionResponse(
            id=response_id,
            created=created,
            model=request.model,
            choices=[
                CompletionChoice(
                    index=i,
                    text=choice.text(),
                    logprobs=choice.legacy_logprobs() if request.logprobs is not None else None,
                    finish_reason=choice.finish_reason(),
                )
                for i, choice in enumerate(choices)
            ],
            usage=_usage(choices, prompts=choices[::n]),
        )

    async def _completion_events(
        self,
        request: CompletionRequest,
        response_id: str,
        created: int,
        n: int,
        total: int,
        first: tuple[int, worker_pb2.GenerateResponse] | None,
        merged: AsyncGenerator[tuple[int, worker_pb2.GenerateResponse], None],
    ) -> AsyncGenerator[str, None]:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        choices = [_Choice() for _ in range(total)]
        try:
            async for index, message in _chain(first, merged):
                choice = choices[index]
                offset = choice.text_length
                choice.add(message)
                if not (message.text or message.logprobs or message.finish_reason):
                    continue
                logprobs = None
                if request.logprobs is not None:
                    logprobs = _legacy_logprobs(list(message.logprobs), offset)
                finish = None
                if message.finish_reason:
                    finish = _FINISH_REASONS.get(message.finish_reason, "stop")
                yield _sse(
                    CompletionChunk(
                        id=response_id,
                        created=created,
                        model=request.model,
                        choices=[
                            CompletionChoice(
                                index=index,
                                text=message.text,
                                logprobs=logprobs,
                                finish_reason=finish,
                            )
                        ],
                    ),
                    include_usage,
                )
            if include_usage:
                final = CompletionChunk(
                    id=response_id,
                    created=created,
                    model=request.model,
                    choices=[],
                    usage=_usage(choices, prompts=choices[::n]),
                )
                yield _sse(final, include_usage)
        except HandledError as error:
            yield _sse_error(error)
        finally:
            await merged.aclose()
        yield "data: [DONE]\n\n"

    # --- embeddings ------------------------------------------------------------------------------

    async def create_embedding(
        self, request: EmbeddingRequest, ctx: RequestContext
    ) -> EmbeddingResponse:
        if request.dimensions is not None:
            raise InvalidRequestError(
                "'dimensions' is not supported: embeddings have the model's own size.",
                param="dimensions",
            )
        inputs = _embedding_inputs(request.input)
        response = await self.upstream.embed(
            worker_pb2.EmbedRequest(model=request.model, inputs=inputs, request_id=ctx.request_id),
            deadline=Deadline(self.timeouts.embeddings),
            metadata=ctx.metadata,
        )
        as_base64 = request.encoding_format == "base64"
        return EmbeddingResponse(
            data=[
                EmbeddingData(
                    index=i,
                    embedding=_base64_floats(item.values) if as_base64 else list(item.values),
                )
                for i, item in enumerate(response.embeddings)
            ],
            model=request.model,
            usage=EmbeddingUsage(
                prompt_tokens=response.prompt_tokens, total_tokens=response.prompt_tokens
            ),
        )

    # --- shared ----------------------------------------------------------------------------------

    def _generation_deadline(self, stream: bool | None, ctx: RequestContext) -> Deadline:
        """A stream's gRPC deadline is its total cap (its first token is awaited within
        timeouts.first_token by `_first`); anything else has the request's budget."""
        return Deadline(self.timeouts.stream) if stream else ctx.deadline

    def _generate(
        self,
        base: worker_pb2.GenerateRequest,
        request: SamplingExtras,
        ctx: RequestContext,
        deadline: Deadline,
        *,
        index: int,
        seed_offset: int,
        many: bool,
        renames: Mapping[str, str],
    ) -> AsyncGenerator[worker_pb2.GenerateResponse, None]:
        call = worker_pb2.GenerateRequest()
        call.CopyFrom(base)
        # Each call of a request needs its own id: the worker keys cancellation on it.
        call.request_id = f"{ctx.request_id}-{index}" if many else ctx.request_id
        call.sampling.CopyFrom(_sampling(request, seed_offset))
        stream = self.upstream.generate(call, deadline=deadline, metadata=ctx.metadata)
        return _renaming_params(stream, renames) if renames else stream


# --- request translation --------------------------------------------------------------------------


def _unsupported(param: str, what: str) -> InvalidRequestError:
    return InvalidRequestError(f"'{param}' is not supported by chatfleet: {what}.", param=param)


def _reject_unsupported_chat(request: ChatCompletionRequest) -> None:
    if request.audio is not None:
        raise _unsupported("audio", "only text output is available")
    if request.modalities not in (None, ["text"]):
        raise _unsupported("modalities", 'only ["text"] is available')
    if request.prediction is not None:
        raise _unsupported("prediction", "predicted outputs are not available")
    if request.reasoning_effort is not None:
        raise _unsupported("reasoning_effort", "the models do not take a reasoning budget")
    if request.web_search_options is not None:
        raise _unsupported("web_search_options", "web search is not available")
    if request.top_logprobs is not None and not request.logprobs:
        raise InvalidRequestError(
            "'logprobs' must be true when 'top_logprobs' is given.", param="top_logprobs"
        )


def _reject_unsupported_completion(request: CompletionRequest) -> None:
    if request.suffix:
        raise _unsupported("suffix", "insertion (fill in the middle) is not available")
    if request.best_of not in (None, 1, request.n or 1):
        raise _unsupported("best_of", "best_of must be left out or equal n")
    if request.max_tokens == 0 and not request.echo:
        raise InvalidRequestError(
            "'max_tokens' may be 0 only with 'echo': it scores the prompt without generating.",
            param="max_tokens",
        )


def _conversation(request: ChatCompletionRequest, tools: ChatTools) -> worker_pb2.ChatMessages:
    chat = worker_pb2.ChatMessages(
        messages=chat_messages(request.messages), tools=tools.definitions
    )
    if request.chat_template_kwargs:
        chat.template_kwargs.update(request.chat_template_kwargs)
    return chat


def _constrain(
    request: worker_pb2.GenerateRequest, constraint: Constraint | None, tools: ChatTools | None
) -> None:
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


def _worker_param_renames(constraint: Constraint | None, tools: ChatTools | None) -> dict[str, str]:
    """The worker names the constraint it could not compile "constraint": the client knows it by
    the field it used (or by its tools, whose schemas force a required or named call)."""
    if constraint is not None:
        return {WORKER_CONSTRAINT_PARAM: constraint.param}
    if tools is not None and tools.forced:
        return {WORKER_CONSTRAINT_PARAM: tools.definitions_param}
    return {}


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


def _logit_bias(value: Mapping[str, object] | None) -> dict[int, float]:
    bias: dict[int, float] = {}
    for key, amount in (value or {}).items():
        if not (key.isascii() and key.isdigit() and int(key) <= _UINT32_MAX):
            raise InvalidRequestError(
                f"'logit_bias' keys must be token ids (strings of digits), got {key!r}.",
                param="logit_bias",
            )
        if (
            isinstance(amount, bool)
            or not isinstance(amount, int | float)
            or not -MAX_LOGIT_BIAS <= amount <= MAX_LOGIT_BIAS
        ):
            raise InvalidRequestError(
                f"'logit_bias' values must be numbers in [-100, 100], got {amount!r} for {key}.",
                param="logit_bias",
            )
        bias[int(key)] = float(amount)
    return bias


def _sampling(request: SamplingExtras, seed_offset: int) -> worker_pb2.SamplingParams:
    sampling = worker_pb2.SamplingParams()
    if request.temperature is not None:
        sampling.temperature = request.temperature
    if request.top_p is not None:
        sampling.top_p = request.top_p
    if request.top_k is not None and request.top_k > 0:
        sampling.top_k = request.top_k
    if request.min_p is not None:
        sampling.min_p = request.min_p
    if request.repetition_penalty is not None:
        sampling.repetition_penalty = request.repetition_penalty
    if request.presence_penalty is not None:
        sampling.presence_penalty = request.presence_penalty
    if request.frequency_penalty is not None:
        sampling.frequency_penalty = request.frequency_penalty
    if request.seed is not None:
        sampling.seed = (request.seed + seed_offset) % 2**64
    sampling.logit_bias.update(_logit_bias(request.logit_bias))
    return sampling


def _stopping(request: SamplingExtras, max_tokens: int | None) -> worker_pb2.StoppingCriteria:
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or ())
    stopping = worker_pb2.StoppingCriteria(
        min_tokens=request.min_tokens or 0,
        # An empty stop string would end every answer at once; OpenAI ignores it too.
        stop=[text for text in stop if text],
        stop_token_ids=request.stop_token_ids or [],
        ignore_eos=bool(request.ignore_eos),
    )
    if max_tokens is not None:
        stopping.max_tokens = max_tokens
    return stopping


def _completion_prompts(prompt: CompletionPrompt) -> list[str | list[int]]:
    """One entry per prompt: a text or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise InvalidRequestError("'prompt' must not be empty.", param="prompt")
    prompts: list[str | list[int]] = []
    ids: list[int] = []
    for i, item in enumerate(prompt):
        if isinstance(item, int):
            ids.append(item)
            continue
        if isinstance(item, list) and not item:
            raise InvalidRequestError("A token id prompt must not be empty.", param=f"prompt[{i}]")
        prompts.append(item)  # type: ignore[arg-type]  # a str or a list of ints
    # pydantic guarantees a list of ints, of strings or of int lists: never a mix.
    return [ids] if ids else prompts


def _embedding_inputs(value: CompletionPrompt) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not value:
        raise InvalidRequestError("'input' must not be empty.", param="input")
    texts = [item for item in value if isinstance(item, str)]
    if len(texts) != len(value):
        raise InvalidRequestError(
            "Token id inputs are not supported for embeddings yet: send the text instead.",
            param="input",
        )
    return texts


# --- response shaping -----------------------------------------------------------------------------


@dataclass
class _Choice:
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
        echo = _legacy_logprobs(self.echo_logprobs, 0)
        completion = _legacy_logprobs(self.logprobs, len("".join(self.echo_parts)))
        return CompletionLogprobs(
            tokens=echo.tokens + completion.tokens,
            token_logprobs=echo.token_logprobs + completion.token_logprobs,
            top_logprobs=echo.top_logprobs + completion.top_logprobs,
            text_offset=echo.text_offset + completion.text_offset,
        )

    def finish_reason(self) -> str:
        # A stream that ended without a final message (never expected) counts as finished.
        return _FINISH_REASONS.get(self.finish, "stop")


def _usage(choices: Sequence[_Choice], *, prompts: Sequence[_Choice]) -> UsageInfo:
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


def _chat_logprobs(entries: Sequence[worker_pb2.TokenLogprob]) -> ChatLogprobs:
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


def _legacy_logprobs(entries: Sequence[worker_pb2.TokenLogprob], offset: int) -> CompletionLogprobs:
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


def _base64_floats(values: Sequence[float]) -> str:
    """Little-endian float32 bytes in base64, as the OpenAI SDK decodes them."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


def _sse(chunk: BaseModel, include_usage: bool) -> str:
    exclude = None if include_usage else {"usage"}
    return f"data: {chunk.model_dump_json(exclude=exclude)}\n\n"


def _sse_error(error: APIError | ChatfleetError | grpc.aio.AioRpcError) -> str:
    api_error = to_api_error(error)
    logger.warning("stream failed after it started: %s", api_error.message)
    return f"data: {json.dumps(api_error.body())}\n\n"


# --- stream plumbing ------------------------------------------------------------------------------


async def _next(stream: AsyncIterator[T]) -> T:
    return await stream.__anext__()


async def _merge(
    streams: Sequence[AsyncGenerator[T, None]],
) -> AsyncGenerator[tuple[int, T], None]:
    """Interleave several streams as their items arrive, tagging each item with its stream's index.

    The first failure ends the merge; closing it (or cancelling its reader) closes every stream,
    which cancels that stream's gRPC call.
    """
    pending = {asyncio.ensure_future(_next(stream)): i for i, stream in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.__getitem__):
                index = pending.pop(task)
                try:
                    item = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(_next(streams[index]))] = index
                yield index, item
    finally:
        for task in pending:
            task.cancel()  # a no-op on the reads that completed
        for task, index in pending.items():
            if task.done():
                # A read completed but its item will never be consumed: that stream waits at a
                # `yield`, where no cancellation reaches it. Close it now rather than whenever it
                # is garbage collected.
                task.exception()  # retrieved: its failure is moot once the merge is over
                await streams[index].aclose()
        if pending:
            # The other streams are inside a read: let the cancellation unwind them, so each call
            # is cancelled before the caller goes on.
            await asyncio.wait(pending)
        for stream in streams:
            await stream.aclose()  # a no-op but for a stream whose read was cancelled unbegun


async def _first(
    stream: AsyncGenerator[tuple[int, T], None], timeout: float
) -> tuple[int, T] | None:
    """Wait for a stream's first item (None if it has none), so that an early failure is raised
    here, before any HTTP response has started. Past `timeout` seconds the stream is closed (its
    calls cancelled) and DEADLINE_EXCEEDED (504) raised."""
    try:
        return await asyncio.wait_for(anext(stream), timeout)
    except StopAsyncIteration:
        return None
    except asyncio.TimeoutError:
        await stream.aclose()
        raise DeadlineExceededError() from None


async def _chain(
    first: tuple[int, T] | None, rest: AsyncIterator[tuple[int, T]]
) -> AsyncGenerator[tuple[int, T], None]:
    if first is not None:
        yield first
    async for item in rest:
        yield item
