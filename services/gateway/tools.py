"""Tool calling at the edge: OpenAI's tools and tool_choice (and their legacy `functions` spelling)
to worker.proto, and the worker's tool-call pieces back to OpenAI's shapes. The worker's
ToolDefinition and ToolChoice are built here for chat and the Responses API alike; tool turns of the
conversation are translated with the other messages (translation.py).

The worker renders the tools with the chat template, forces REQUIRED and NAMED choices with a
grammar and parses the calls out of the output; the gateway checks what the client sent and keeps
the streamed shape exactly what the openai SDK accumulates (id, type and name on a call's first
piece only).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from chatfleet.v1 import worker_pb2
from services.common.errors import InvalidRequestError
from services.gateway.protocol import (
    ChatCompletionRequest,
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    FunctionDefinition,
    FunctionName,
    NamedToolChoice,
    ToolCall,
)

# OpenAI's tool_choice modes -> the worker's (a named function is TOOL_CHOICE_MODE_NAMED).
TOOL_CHOICE_MODES: dict[str, worker_pb2.ToolChoiceMode] = {
    "none": worker_pb2.TOOL_CHOICE_MODE_NONE,
    "auto": worker_pb2.TOOL_CHOICE_MODE_AUTO,
    "required": worker_pb2.TOOL_CHOICE_MODE_REQUIRED,
}


def tool_definition(
    name: str, description: str | None, parameters: Mapping[str, Any] | None, *, strict: bool
) -> worker_pb2.ToolDefinition:
    """A function the model may call; `parameters` None: it takes none."""
    return worker_pb2.ToolDefinition(
        name=name,
        description=description or "",
        parameters_json="" if parameters is None else json.dumps(parameters),
        strict=strict,
    )


def tool_choice(
    mode: str | None, parallel: bool | None, *, name: str | None = None
) -> worker_pb2.ToolChoice:
    """The worker's ToolChoice: a `mode` of TOOL_CHOICE_MODES, or the function `name` the model
    must call (mode None); `parallel` None leaves parallel calls to the worker's default."""
    choice = worker_pb2.ToolChoice()
    if parallel is not None:
        choice.parallel_tool_calls = parallel
    if name is not None:
        choice.mode = worker_pb2.TOOL_CHOICE_MODE_NAMED
        choice.name = name
    elif mode is not None:
        choice.mode = TOOL_CHOICE_MODES[mode]
    return choice


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
    parallel = request.parallel_tool_calls
    if isinstance(choice_value, FunctionName | NamedToolChoice):
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
        choice = tool_choice(None, parallel, name=name)
    else:
        choice = tool_choice(choice_value or "auto", parallel)
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
    return tool_definition(
        function.name, function.description, function.parameters, strict=bool(function.strict)
    )


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
