"""Structured output at the edge: OpenAI's `response_format`, vLLM's `structured_outputs` and its
older `guided_*` fields, checked and translated to one worker_pb2.OutputConstraint; and the text
formats (text, json_object, json_schema) that chat's response_format and the Responses API's
text.format share, translated by `text_format_constraint` for both.

A request names at most one constraint; the worker compiles it (and refuses what it cannot with
INVALID_ARGUMENT on param "constraint", which the gateway reports on the field the client used).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from chatfleet.v1 import worker_pb2
from services.common.errors import InvalidRequestError
from services.gateway.protocol import SamplingExtras

logger = logging.getLogger(__name__)

# The worker's name for the field at fault when it cannot compile a constraint.
WORKER_CONSTRAINT_PARAM = "constraint"

_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")
# vLLM knobs of its grammar backends: no meaning here.
_IGNORED_STRUCTURED_FIELDS = frozenset(
    {
        "backend",
        "disable_fallback",
        "disable_any_whitespace",
        "disable_additional_properties",
        "whitespace_pattern",
    }
)


TextFormat = Literal["text", "json_object", "json_schema"]
TEXT_FORMATS: tuple[TextFormat, ...] = ("text", "json_object", "json_schema")


def text_format_constraint(
    kind: TextFormat, schema: Mapping[str, Any] | None = None
) -> worker_pb2.OutputConstraint | None:
    """The constraint of a text format: none for "text", any JSON object for "json_object", JSON
    that follows `schema` for "json_schema" (enforced, strict or not: a constraint the client
    asked for is never dropped)."""
    if kind == "json_object":
        return worker_pb2.OutputConstraint(json_object=True)
    if kind == "json_schema":
        return worker_pb2.OutputConstraint(json_schema=json.dumps(schema))
    return None


@dataclass(frozen=True)
class Constraint:
    """An output constraint and the request field it came from."""

    proto: worker_pb2.OutputConstraint
    param: str


def output_constraint(request: SamplingExtras) -> Constraint | None:
    """The request's one output constraint, or None for free text."""
    if request.guided_decoding_backend is not None:
        logger.warning("ignoring guided_decoding_backend: chatfleet has one grammar backend")
    if request.guided_whitespace_pattern is not None:
        logger.warning("ignoring guided_whitespace_pattern: the grammar backend sets whitespace")
    found = [
        constraint
        for constraint in (
            _response_format(request.response_format),
            _structured_outputs(request.structured_outputs),
            _guided(request),
        )
        if constraint is not None
    ]
    if len(found) > 1:
        raise InvalidRequestError(
            f"'{found[0].param}' and '{found[1].param}' both constrain the output: send one.",
            param=found[1].param,
        )
    return found[0] if found else None


def _response_format(value: Any) -> Constraint | None:
    param = "response_format"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequestError("'response_format' must be an object.", param=param)
    kind = value.get("type")
    if kind not in TEXT_FORMATS:
        raise InvalidRequestError(
            "'response_format.type' must be 'text', 'json_object' or 'json_schema'.", param=param
        )
    schema = _response_format_schema(value) if kind == "json_schema" else None
    proto = text_format_constraint(kind, schema)
    return None if proto is None else Constraint(proto, param)


def _response_format_schema(value: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON Schema of a `json_schema` response_format, its wrapper checked."""
    param = "response_format"
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequestError(
            "'response_format.json_schema' must be an object with a 'name' and a 'schema'.",
            param=param,
        )
    if not isinstance(spec.get("name"), str):
        raise InvalidRequestError(
            "'response_format.json_schema.name' must be a string.", param=param
        )
    if not isinstance(spec.get("description", ""), str | None):
        raise InvalidRequestError(
            "'response_format.json_schema.description' must be a string.", param=param
        )
    if not isinstance(spec.get("strict"), bool | None):
        raise InvalidRequestError(
            "'response_format.json_schema.strict' must be a boolean.", param=param
        )
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequestError(
            "'response_format.json_schema.schema' must be a JSON Schema object.", param=param
        )
    return schema


def _structured_outputs(value: Any) -> Constraint | None:
    param = "structured_outputs"
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidRequestError("'structured_outputs' must be an object.", param=param)
    if "structural_tag" in value:
        raise InvalidRequestError(
            "'structured_outputs.structural_tag' is not supported: use json, regex, choice, "
            "grammar or json_object.",
            param=param,
        )
    ignored = sorted(set(value) & _IGNORED_STRUCTURED_FIELDS)
    if ignored:
        logger.warning("ignoring structured_outputs fields: %s", ", ".join(ignored))
    if value.get("json_object") not in (None, True, False):
        raise InvalidRequestError(
            "'structured_outputs.json_object' must be a boolean.", param=param
        )
    given = [
        kind
        for kind in _STRUCTURED_KINDS
        if value.get(kind) is not None and value.get(kind) is not False
    ]
    if len(given) != 1:
        raise InvalidRequestError(
            "'structured_outputs' needs exactly one of: " + ", ".join(_STRUCTURED_KINDS) + ".",
            param=param,
        )
    [kind] = given
    where = f"structured_outputs.{kind}"
    item = value[kind]
    if kind == "json":
        proto = worker_pb2.OutputConstraint(json_schema=_json_schema(item, where, param))
    elif kind == "regex":
        proto = worker_pb2.OutputConstraint(regex=_string(item, where, param))
    elif kind == "choice":
        proto = worker_pb2.OutputConstraint(choice=_choices(item, where, param))
    elif kind == "grammar":
        proto = worker_pb2.OutputConstraint(grammar=_grammar(item, where, param))
    else:
        proto = worker_pb2.OutputConstraint(json_object=True)
    return Constraint(proto, param)


def _guided(request: SamplingExtras) -> Constraint | None:
    """vLLM's older guided_* fields; more than one of them is refused like any two sources."""
    found = []
    if request.guided_json is not None:
        schema = _json_schema(request.guided_json, "guided_json", "guided_json")
        found.append(Constraint(worker_pb2.OutputConstraint(json_schema=schema), "guided_json"))
    if request.guided_regex is not None:
        found.append(
            Constraint(worker_pb2.OutputConstraint(regex=request.guided_regex), "guided_regex")
        )
    if request.guided_choice is not None:
        choices = _choices(request.guided_choice, "guided_choice", "guided_choice")
        found.append(Constraint(worker_pb2.OutputConstraint(choice=choices), "guided_choice"))
    if request.guided_grammar is not None:
        grammar = _grammar(request.guided_grammar, "guided_grammar", "guided_grammar")
        found.append(Constraint(worker_pb2.OutputConstraint(grammar=grammar), "guided_grammar"))
    if len(found) > 1:
        raise InvalidRequestError(
            f"'{found[0].param}' and '{found[1].param}' both constrain the output: send one.",
            param=found[1].param,
        )
    return found[0] if found else None


def _json_schema(value: Any, where: str, param: str) -> str:
    """A JSON Schema given as an object or as JSON text, as JSON text."""
    schema = value
    if isinstance(value, str):
        try:
            schema = json.loads(value)
        except json.JSONDecodeError as error:
            raise InvalidRequestError(
                f"'{where}' is not valid JSON: {error.msg} at offset {error.pos}.", param=param
            ) from None
    if not isinstance(schema, Mapping):
        raise InvalidRequestError(f"'{where}' must be a JSON Schema object.", param=param)
    return json.dumps(schema)


def _string(value: Any, where: str, param: str) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(f"'{where}' must be a string.", param=param)
    return value


def _grammar(value: Any, where: str, param: str) -> str:
    if not _string(value, where, param).strip():
        raise InvalidRequestError(f"'{where}' must not be empty.", param=param)
    return str(value)


def _choices(value: Any, where: str, param: str) -> worker_pb2.ChoiceList:
    if not isinstance(value, list) or not value:
        raise InvalidRequestError(f"'{where}' must be a non-empty list of strings.", param=param)
    for choice in value:
        if not isinstance(choice, str) or not choice:
            raise InvalidRequestError(f"'{where}' must hold non-empty strings only.", param=param)
    return worker_pb2.ChoiceList(choices=value)
