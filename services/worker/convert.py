"""Conversion between the worker's protobuf messages and the engine's dataclasses, in one place.

Checks here cover what protobuf's shape cannot express (required oneofs, JSON text, tool names);
value ranges are the engine's rules (engine/validation.py), applied here before a request reaches
an engine. An error names the faulty field with its OpenAI parameter name so the gateway can pass
it on.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from chatfleet.v1 import common_pb2, worker_pb2
from services.common.errors import InvalidRequestError
from services.common.limits import FUNCTION_NAME_PATTERN
from services.worker.engine.interface import (
    ChatMessage,
    ConstraintKind,
    Conversation,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    LoadInfo,
    ModelDescription,
    OutputConstraint,
    Prompt,
    SamplingParams,
    StoppingParams,
    ToolCall,
    ToolDefinition,
)
from services.worker.engine.prompts import CHAT_ROLES
from services.worker.engine.tools import ToolChoice, ToolChoiceMode, tool_constraint
from services.worker.engine.validation import (
    greedy_if_tiny,
    validate_logit_bias,
    validate_sampling,
    validate_stopping,
    validate_top_logprobs,
)

_TOOL_NAME = re.compile(FUNCTION_NAME_PATTERN)
# Engine finish reasons as the protobuf spells them (the one map of them).
_FINISH_REASONS = {
    None: worker_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: worker_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: worker_pb2.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: worker_pb2.FINISH_REASON_CANCELLED,
    FinishReason.TOOL_CALLS: worker_pb2.FINISH_REASON_TOOL_CALLS,
}
_TOOL_CHOICE_MODES = {
    worker_pb2.TOOL_CHOICE_MODE_NONE: ToolChoiceMode.NONE,
    worker_pb2.TOOL_CHOICE_MODE_AUTO: ToolChoiceMode.AUTO,
    worker_pb2.TOOL_CHOICE_MODE_REQUIRED: ToolChoiceMode.REQUIRED,
    worker_pb2.TOOL_CHOICE_MODE_NAMED: ToolChoiceMode.NAMED,
}


def to_generation_request(
    request: worker_pb2.GenerateRequest, defaults: SamplingParams | None = None
) -> GenerationRequest:
    """Validate a GenerateRequest and turn it into the engine's GenerationRequest. A forced tool
    choice (REQUIRED, NAMED) replaces the request's constraint with its tools' schema."""
    which = request.WhichOneof("prompt")
    choice = to_tool_choice(request)
    prompt: Prompt
    tools: tuple[ToolDefinition, ...] = ()
    if which == "text":
        if not request.text:
            raise InvalidRequestError("the prompt must not be empty", param="prompt")
        prompt = request.text
    elif which == "chat":
        prompt = to_conversation(request.chat, include_tools=choice.mode is not ToolChoiceMode.NONE)
        tools = prompt.tools if isinstance(prompt, Conversation) else ()
    elif which == "token_ids":
        if not request.token_ids.ids:
            raise InvalidRequestError("the prompt must contain at least one token", param="prompt")
        prompt = list(request.token_ids.ids)
    else:
        raise InvalidRequestError("a prompt (text, chat or token_ids) is required", param="prompt")
    constraint = tool_constraint(tools, choice)
    if constraint is None and request.HasField("constraint"):
        constraint = to_output_constraint(request.constraint)
    logprobs = _logprobs(request.logprobs)
    _check(
        not request.logprobs.prompt or request.echo,
        "echo",
        "must be set to score the prompt (prompt logprobs come with the echoed prompt)",
    )
    return GenerationRequest(
        request_id=request.request_id or uuid.uuid4().hex,
        prompt=prompt,
        sampling=_sampling(request.sampling, defaults or SamplingParams()),
        stopping=_stopping(request.stopping, echo=request.echo),
        logprobs=logprobs,
        echo=request.echo,
        prompt_logprobs=request.logprobs.prompt,
        constraint=constraint,
        logit_bias=_logit_bias(request.sampling.logit_bias),
    )


def to_tool_choice(request: worker_pb2.GenerateRequest) -> ToolChoice:
    """The request's tool choice, resolved: UNSPECIFIED is AUTO with tools and NONE without; a
    forced choice needs tools (and NAMED a known function)."""
    tools = request.chat.tools if request.WhichOneof("prompt") == "chat" else ()
    proto = request.tool_choice
    parallel = proto.parallel_tool_calls if proto.HasField("parallel_tool_calls") else True
    mode = _TOOL_CHOICE_MODES.get(proto.mode)
    if proto.mode == worker_pb2.TOOL_CHOICE_MODE_UNSPECIFIED:
        mode = ToolChoiceMode.AUTO if tools else ToolChoiceMode.NONE
    if mode is None:
        raise InvalidRequestError(f"unknown tool_choice mode {proto.mode}", param="tool_choice")
    if mode is ToolChoiceMode.AUTO and not tools:
        mode = ToolChoiceMode.NONE
    if mode in (ToolChoiceMode.REQUIRED, ToolChoiceMode.NAMED) and not tools:
        raise InvalidRequestError(
            f"tool_choice '{mode.value}' needs tools in the request", param="tool_choice"
        )
    if mode is ToolChoiceMode.NAMED:
        names = [tool.name for tool in tools]
        if proto.name not in names:
            raise InvalidRequestError(
                f"tool_choice names the function {proto.name!r}, which is not among the tools "
                f"({', '.join(names)})",
                param="tool_choice",
            )
    name = proto.name if mode is ToolChoiceMode.NAMED else ""
    return ToolChoice(mode=mode, name=name, parallel_tool_calls=parallel)


def to_chat_messages(chat: worker_pb2.ChatMessages) -> list[ChatMessage]:
    """The turns of a conversation; at least one, each with a known role, tool turns answering a
    call, assistant calls with JSON arguments."""
    if not chat.messages:
        raise InvalidRequestError("'messages' must contain at least one message", param="messages")
    return [_chat_message(index, message) for index, message in enumerate(chat.messages)]


def to_conversation(
    chat: worker_pb2.ChatMessages, *, include_tools: bool = True
) -> list[ChatMessage] | Conversation:
    """The conversation: plain messages, or a Conversation when it brings tools (unless they are
    left out, for tool_choice none) or template variables."""
    messages = to_chat_messages(chat)
    tools = to_tool_definitions(chat.tools)
    template_kwargs: dict[str, Any] = (
        json_format.MessageToDict(chat.template_kwargs) if chat.HasField("template_kwargs") else {}
    )
    if not include_tools:
        tools = ()
    if not tools and not template_kwargs:
        return messages
    return Conversation(messages=tuple(messages), tools=tools, template_kwargs=template_kwargs)


def to_tool_definitions(
    tools: Sequence[worker_pb2.ToolDefinition],
) -> tuple[ToolDefinition, ...]:
    """Function tools with valid, unique names and object schemas for their arguments."""
    seen: set[str] = set()
    definitions = []
    for index, tool in enumerate(tools):
        where = f"tools[{index}].function"
        if not _TOOL_NAME.fullmatch(tool.name):
            raise InvalidRequestError(
                f"{where}.name must be 1 to 64 letters, digits, underscores or dashes, "
                f"got {tool.name!r}",
                param=f"{where}.name",
            )
        if tool.name in seen:
            raise InvalidRequestError(
                f"{where}.name: the function {tool.name!r} is defined twice",
                param=f"{where}.name",
            )
        seen.add(tool.name)
        parameters: Mapping[str, Any] | None = None
        if tool.parameters_json:
            try:
                parameters = json.loads(tool.parameters_json)
            except ValueError as exc:
                raise InvalidRequestError(
                    f"{where}.parameters is not JSON: {exc}", param=f"{where}.parameters"
                ) from exc
            if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
                raise InvalidRequestError(
                    f"{where}.parameters must be a JSON Schema of an object",
                    param=f"{where}.parameters",
                )
        definitions.append(
            ToolDefinition(
                name=tool.name,
                description=tool.description,
                parameters=parameters,
                strict=tool.strict,
            )
        )
    return tuple(definitions)


def to_output_constraint(constraint: worker_pb2.OutputConstraint) -> OutputConstraint | None:
    """The engine's constraint; None when no kind is set. The grammar library judges the rest."""
    which = constraint.WhichOneof("kind")
    if which is None:
        return None
    if which == "json_object":
        return OutputConstraint(kind=ConstraintKind.JSON_OBJECT)
    if which == "choice":
        choices = tuple(constraint.choice.choices)
        _check(bool(choices), "constraint", "needs at least one choice")
        _check(all(choices), "constraint", "choices must not be empty")
        return OutputConstraint(kind=ConstraintKind.CHOICE, choices=choices)
    spec: str = getattr(constraint, which)
    _check(bool(spec.strip()), "constraint", f"{which} must not be empty")
    if which == "json_schema":
        try:
            schema = json.loads(spec)
        except ValueError as exc:
            raise InvalidRequestError(
                f"'constraint' json_schema is not JSON: {exc}", param="constraint"
            ) from exc
        _check(isinstance(schema, (dict, bool)), "constraint", "json_schema must be a JSON object")
    return OutputConstraint(kind=ConstraintKind(which), spec=spec)


def to_tokenize_prompt(
    request: worker_pb2.TokenizeRequest,
) -> str | list[ChatMessage] | Conversation:
    """What a TokenizeRequest asks to tokenize: text (possibly empty) or a conversation."""
    which = request.WhichOneof("input")
    if which == "text":
        return request.text
    if which == "chat":
        return to_conversation(request.chat)
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
        reasoning_text=chunk.reasoning_text,
        tool_calls=[
            worker_pb2.ToolCallDelta(
                index=delta.index, id=delta.id, name=delta.name, arguments=delta.arguments
            )
            for delta in chunk.tool_calls
        ],
    )
    if chunk.finish_reason is not None:
        response.usage.CopyFrom(
            worker_pb2.Usage(
                prompt_tokens=chunk.prompt_tokens, completion_tokens=chunk.completion_tokens
            )
        )
        response.cached_prompt_tokens = chunk.cached_prompt_tokens
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
        tool_call_parser=description.tool_call_parser,
        reasoning_parser=description.reasoning_parser,
    )


def to_load(load: LoadInfo) -> common_pb2.Load:
    return common_pb2.Load(running=load.running, waiting=load.waiting, capacity=load.capacity)


def _sampling(params: worker_pb2.SamplingParams, defaults: SamplingParams) -> SamplingParams:
    """Fields the request leaves unset take the model's defaults; tiny temperatures decode
    greedily."""
    sampling = SamplingParams(
        temperature=_optional(params, "temperature", defaults.temperature),
        top_p=_optional(params, "top_p", defaults.top_p),
        top_k=params.top_k if params.HasField("top_k") else defaults.top_k,
        min_p=_optional(params, "min_p", defaults.min_p),
        repetition_penalty=_optional(params, "repetition_penalty", defaults.repetition_penalty),
        presence_penalty=_optional(params, "presence_penalty", defaults.presence_penalty),
        frequency_penalty=_optional(params, "frequency_penalty", defaults.frequency_penalty),
        seed=params.seed if params.HasField("seed") else defaults.seed,
    )
    validate_sampling(sampling)
    return greedy_if_tiny(sampling)


def _stopping(criteria: worker_pb2.StoppingCriteria, *, echo: bool = False) -> StoppingParams:
    """The stopping criteria; the engine checks stop token ids against its vocabulary."""
    stopping = StoppingParams(
        max_tokens=criteria.max_tokens if criteria.HasField("max_tokens") else None,
        min_tokens=criteria.min_tokens,
        stop=tuple(criteria.stop),
        stop_token_ids=tuple(criteria.stop_token_ids),
        ignore_eos=criteria.ignore_eos,
    )
    validate_stopping(stopping, echo=echo)
    return stopping


def _logprobs(params: worker_pb2.LogprobsParams) -> int | None:
    """None when logprobs are off; else how many alternatives per position."""
    if not params.enabled:
        _check(params.top_logprobs == 0, "top_logprobs", "requires logprobs to be enabled")
        return None
    validate_top_logprobs(params.top_logprobs, param="top_logprobs")
    return params.top_logprobs


def _logit_bias(bias: Mapping[int, float]) -> tuple[tuple[int, float], ...]:
    """(token id, bias) pairs in id order; the engine checks the ids against its vocabulary."""
    pairs = tuple(sorted((int(token_id), float(value)) for token_id, value in bias.items()))
    validate_logit_bias(pairs)
    return pairs


def _chat_message(index: int, message: worker_pb2.ChatMessage) -> ChatMessage:
    where = f"messages[{index}]"
    if message.role not in CHAT_ROLES:
        raise InvalidRequestError(
            f"{where}.role must be one of {', '.join(sorted(CHAT_ROLES))}, got {message.role!r}",
            param="messages",
        )
    if message.role == "tool" and not message.tool_call_id:
        raise InvalidRequestError(
            f"{where} is a tool result: its tool_call_id is required",
            param=f"{where}.tool_call_id",
        )
    if message.tool_calls and message.role != "assistant":
        raise InvalidRequestError(
            f"{where}.tool_calls: only assistant turns call tools", param=f"{where}.tool_calls"
        )
    calls = []
    for position, call in enumerate(message.tool_calls):
        call_where = f"{where}.tool_calls[{position}].function"
        if not call.name:
            raise InvalidRequestError(f"{call_where}.name is required", param=f"{call_where}.name")
        arguments = call.arguments or "{}"
        try:
            json.loads(arguments)
        except ValueError as exc:
            raise InvalidRequestError(
                f"{call_where}.arguments must be JSON text: {exc}",
                param=f"{call_where}.arguments",
            ) from exc
        calls.append(ToolCall(id=call.id, name=call.name, arguments=arguments))
    return ChatMessage(
        role=message.role,
        content=message.content,
        tool_calls=tuple(calls),
        tool_call_id=message.tool_call_id,
        name=message.name,
    )


def _optional(message: Message, name: str, default: float) -> float:
    """A proto3 `optional` float field, or `default` when unset."""
    return float(getattr(message, name)) if message.HasField(name) else default


def _check(ok: bool, param: str, problem: str) -> None:
    if not ok:
        raise InvalidRequestError(f"'{param}' {problem}", param=param)
