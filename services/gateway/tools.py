"""Tool calling at the edge: OpenAI's tools, tool_choice and tool turns (and their legacy
`functions` spelling) to worker.proto, and the worker's tool-call pieces back to OpenAI's shapes.

The worker renders the tools with the chat template, forces REQUIRED and NAMED choices with a
grammar and parses the calls out of the output; the gateway checks what the client sent and keeps
the streamed shape exactly what the openai SDK accumulates (id, type and name on a call's first
piece only).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from chatfleet.v1 import worker_pb2
from services.common.errors import InvalidRequestError
from services.gateway.protocol import (
    ChatCompletionRequest,
    ChatMessageParam,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    FunctionDefinition,
    FunctionName,
    NamedToolChoice,
    ToolCall,
)

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


@dataclass(frozen=True)
class ChatTools:
    """The tools of a chat request and how the model may call them (None: no tools)."""

    definitions: list[worker_pb2.ToolDefinition]
    choice: worker_pb2.ToolChoice | None
    # The fields they came from ("tools" or the legacy "functions"; "tool_choice" or
    # "function_call"), to name in errors.
    definitions_param: str = "tools"
    choice_param: str = "tool_choice"

    @property
    def forced(self) -> bool:
        return self.choice is not None and self.choice.mode in (
            worker_pb2.TOOL_CHOICE_MODE_REQUIRED,
            worker_pb2.TOOL_CHOICE_MODE_NAMED,
        )


def chat_tools(request: ChatCompletionRequest) -> ChatTools:
    """Check `tools`/`tool_choice` (or legacy `functions`/`function_call`) and translate them."""
    if request.functions and request.tools:
        raise InvalidRequestError(
            "Send 'tools' or the legacy 'functions', not both.", param="functions"
        )
    if request.function_call is not None and request.tool_choice is not None:
        raise InvalidRequestError(
            "Send 'tool_choice' or the legacy 'function_call', not both.", param="function_call"
        )
    if request.functions:
        functions = list(request.functions)
        where = "functions"
        definitions_param = "functions[{i}]"
    else:
        functions = _function_tools(request)
        where = "tools"
        definitions_param = "tools[{i}].function"
    legacy_choice = request.function_call is not None
    choice_param = "function_call" if legacy_choice else "tool_choice"
    choice_value = request.function_call if legacy_choice else request.tool_choice

    definitions = []
    seen: set[str] = set()
    for i, function in enumerate(functions):
        if function.name in seen:
            raise InvalidRequestError(
                f"Two {where} are named {function.name!r}: function names must be unique.",
                param=definitions_param.format(i=i) + ".name",
            )
        seen.add(function.name)
        definitions.append(_definition(function))

    if not definitions:
        if choice_value not in (None, "none"):
            raise InvalidRequestError(
                f"'{choice_param}' needs '{where}': there is no tool to call.", param=choice_param
            )
        return ChatTools([], None, where, choice_param)
    choice = worker_pb2.ToolChoice()
    if request.parallel_tool_calls is not None:
        choice.parallel_tool_calls = request.parallel_tool_calls
    if choice_value is None or choice_value == "auto":
        choice.mode = worker_pb2.TOOL_CHOICE_MODE_AUTO
    elif choice_value == "none":
        choice.mode = worker_pb2.TOOL_CHOICE_MODE_NONE
    elif choice_value == "required":
        choice.mode = worker_pb2.TOOL_CHOICE_MODE_REQUIRED
    elif isinstance(choice_value, FunctionName | NamedToolChoice):
        name = (
            choice_value.name
            if isinstance(choice_value, FunctionName)
            else choice_value.function.name
        )
        if name not in seen:
            raise InvalidRequestError(
                f"'{choice_param}' names the function {name!r}, which is not in '{where}'.",
                param=choice_param,
            )
        choice.mode = worker_pb2.TOOL_CHOICE_MODE_NAMED
        choice.name = name
    return ChatTools(definitions, choice, where, choice_param)


def _function_tools(request: ChatCompletionRequest) -> list[FunctionDefinition]:
    functions = []
    for i, tool in enumerate(request.tools or ()):
        if tool.type != "function":
            raise InvalidRequestError(
                f"Tools of type {tool.type!r} are not supported: only 'function' tools are.",
                param=f"tools[{i}].type",
            )
        if tool.function is None:
            raise InvalidRequestError(
                "A function tool needs its 'function'.", param=f"tools[{i}].function"
            )
        functions.append(tool.function)
    return functions


def _definition(function: FunctionDefinition) -> worker_pb2.ToolDefinition:
    return worker_pb2.ToolDefinition(
        name=function.name,
        description=function.description or "",
        parameters_json="" if function.parameters is None else json.dumps(function.parameters),
        strict=bool(function.strict),
    )


# --- messages ----------------------------------------------------------------------------------


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


# --- answers -----------------------------------------------------------------------------------


@dataclass
class _CallSoFar:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)


@dataclass
class ToolCallAssembler:
    """The tool calls of one choice, from the worker's pieces: for the streamed deltas (a call's
    first piece with its id, type and name) and for the whole message at the end."""

    calls: dict[int, _CallSoFar] = field(default_factory=dict)

    def add(self, pieces: Sequence[worker_pb2.ToolCallDelta]) -> list[DeltaToolCall]:
        deltas = []
        for piece in pieces:
            known = self.calls.get(piece.index)
            if known is None:
                # The worker names every call; an id it left out is made here, so that a tool
                # turn always has one to answer.
                known = _CallSoFar(piece.id or f"call_{uuid.uuid4().hex[:24]}", piece.name)
                self.calls[piece.index] = known
                deltas.append(
                    DeltaToolCall(
                        index=piece.index,
                        id=known.id,
                        type="function",
                        function=DeltaFunctionCall(name=known.name, arguments=piece.arguments),
                    )
                )
            else:
                deltas.append(
                    DeltaToolCall(
                        index=piece.index, function=DeltaFunctionCall(arguments=piece.arguments)
                    )
                )
            known.arguments.append(piece.arguments)
        return deltas

    def tool_calls(self) -> list[ToolCall] | None:
        """The whole calls in index order; None when the model called none."""
        if not self.calls:
            return None
        return [
            ToolCall(
                id=call.id,
                function=FunctionCall(name=call.name, arguments="".join(call.arguments)),
            )
            for _, call in sorted(self.calls.items())
        ]
