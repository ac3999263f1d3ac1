"""Tool choice: whether a request may, must or must not call tools, and the JSON Schema that forces
a call (REQUIRED: an array of calls; NAMED: one function's arguments) through the sampler's
grammar constraint."""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidRequestError
from services.worker.engine.interface import ConstraintKind, OutputConstraint, ToolDefinition

# The arguments schema of a function that declares none.
EMPTY_PARAMETERS: Mapping[str, Any] = {"type": "object", "properties": {}}


class ToolChoiceMode(enum.Enum):
    NONE = "none"  # plain text; the tools are left out of the prompt
    AUTO = "auto"  # the model decides; its tool-call syntax is parsed from the output
    REQUIRED = "required"  # at least one call, forced by a grammar
    NAMED = "named"  # exactly one call of `name`, forced by its arguments' schema


@dataclass(frozen=True)
class ToolChoice:
    mode: ToolChoiceMode
    name: str = ""  # for NAMED
    parallel_tool_calls: bool = True  # False: at most one call per answer


def tool_constraint(tools: Sequence[ToolDefinition], choice: ToolChoice) -> OutputConstraint | None:
    """The constraint forcing the chosen calls, or None when the model is free (NONE, AUTO)."""
    if choice.mode is ToolChoiceMode.REQUIRED:
        schema = required_schema(tools, parallel_tool_calls=choice.parallel_tool_calls)
    elif choice.mode is ToolChoiceMode.NAMED:
        schema = named_schema(tools, choice.name)
    else:
        return None
    return OutputConstraint(kind=ConstraintKind.JSON_SCHEMA, spec=json.dumps(schema))


def required_schema(
    tools: Sequence[ToolDefinition], *, parallel_tool_calls: bool = True
) -> dict[str, Any]:
    """A JSON array of {"name", "arguments"} objects, one alternative per tool."""
    if not tools:
        raise InvalidRequestError("tool_choice 'required' needs at least one tool", param="tools")
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "name": {"const": tool.name},
                        "arguments": dict(parameters_schema(tool)),
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
                for tool in tools
            ]
        },
    }
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


def named_schema(tools: Sequence[ToolDefinition], name: str) -> dict[str, Any]:
    """The arguments schema of the function `name`: the whole output is its arguments."""
    for tool in tools:
        if tool.name == name:
            return dict(parameters_schema(tool))
    known = ", ".join(tool.name for tool in tools) or "none"
    raise InvalidRequestError(
        f"tool_choice names the function {name!r}, which is not among the tools ({known})",
        param="tool_choice",
    )


def parameters_schema(tool: ToolDefinition) -> Mapping[str, Any]:
    return tool.parameters if tool.parameters is not None else EMPTY_PARAMETERS
