"""Pydantic models of the OpenAI HTTP API as the gateway speaks it: requests and responses.

Request models validate types and ranges strictly (JSON mode: "1" is not a number, "yes" is not a
boolean). Unknown fields are logged and ignored; fields OpenAI defines that chatfleet cannot honour
are declared here and rejected with a 400 by their endpoint's handler (serving_*.py). Fields whose
checks need more than types (tools, response_format, structured_outputs, logit_bias) are read
loosely here and checked where they are translated (tools.py, structured.py, translation.py). Their
JSON schemas are the request bodies of the gateway's OpenAPI document (app.py). Limits shared with
the worker (top_logprobs, function names) come from services/common/limits.py.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticCustomError

from services.common.limits import (
    FUNCTION_NAME_PATTERN,
    LOGIT_BIAS_MAX,
    LOGIT_BIAS_MIN,
    MAX_TOP_LOGPROBS,
)

logger = logging.getLogger(__name__)

MAX_N = 128
# Prompts (or embedding inputs) of one request, as OpenAI limits embedding inputs; and choices of
# one completions request (n times the prompts), each of which is a Generate call upstream: a
# request that fails cancels all of its calls, and a burst of thousands of cancelled calls makes a
# gRPC server refuse new ones for a moment (its defence against HTTP/2 rapid resets).
MAX_PROMPTS = 2048
MAX_CHOICES = 256
# The largest token id, count or token budget a request may give (the worker's uint32 fields).
UINT32_MAX = 2**32 - 1

TokenId = Annotated[int, Field(ge=0, le=UINT32_MAX)]


class OpenAIRequestModel(BaseModel):
    """Base of request models: strict types; unknown fields kept aside, logged and ignored."""

    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="after")
    def _log_unknown_fields(self) -> OpenAIRequestModel:
        if self.model_extra:
            # Names only: values may hold user content.
            logger.warning(
                "ignoring unknown fields in %s: %s",
                type(self).__name__,
                ", ".join(sorted(self.model_extra)),
            )
        return self


JsonSchemaEdit = Callable[[dict[str, Any]], None]
_NULL = {"type": "null"}


def _documented(
    accepted: Mapping[str, dict[str, Any]] | None = None, edit: JsonSchemaEdit | None = None
) -> Callable[[dict[str, Any]], None]:
    """A `json_schema_extra` documenting what chatfleet accepts where the model's types are wider
    (they let a field be read so that the 400 can say why it is refused): `accepted` replaces
    the schemas of fields, `edit` changes the model's schema further. This keeps /docs honest,
    and lets schemathesis' valid requests get past the "not supported" checks."""

    def apply(schema: dict[str, Any]) -> None:
        for name, definition in (accepted or {}).items():
            kept = {"default": None} if "default" in schema["properties"][name] else {}
            schema["properties"][name] = {**kept, **definition}
        if edit is not None:
            edit(schema)

    return apply


def _unsupported(*neutral: Any) -> dict[str, Any]:
    """The schema of an unsupported field: left out, null, or one of its neutral values."""
    return {"enum": [None, *neutral], "description": "Not supported: only neutral values pass."}


def _without_null(definition: dict[str, Any]) -> None:
    definition["anyOf"] = [branch for branch in definition["anyOf"] if branch != _NULL]
    definition.pop("default", None)


def _non_empty_lists(definition: dict[str, Any], *, max_items: int | None = None) -> None:
    """Lists in a prompt union (and the token lists inside them) hold one item at least."""
    for branch in definition["anyOf"]:
        if branch.get("type") == "array":
            branch["minItems"] = 1
            if max_items is not None and branch["items"].get("type") != "integer":
                branch["maxItems"] = max_items
            if branch["items"].get("type") == "array":
                branch["items"]["minItems"] = 1


# logit_bias: token ids (as strings) to biases; keys and ranges are checked by translation.py.
_LOGIT_BIAS = {
    "logit_bias": {
        "anyOf": [
            _NULL,
            {
                "type": "object",
                "propertyNames": {"pattern": "^[0-9]{1,10}$"},
                "additionalProperties": {
                    "type": "number",
                    # OpenAI's bounds are whole numbers: documented as integers.
                    "minimum": int(LOGIT_BIAS_MIN),
                    "maximum": int(LOGIT_BIAS_MAX),
                },
            },
        ],
        "description": f"Token id (a string of digits) to a bias in [{LOGIT_BIAS_MIN:g}, "
        f"{LOGIT_BIAS_MAX:g}] added to its logit.",
    }
}
_JSON_SCHEMA_FORMAT = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "description": {"type": ["string", "null"]},
        "schema": {"type": "object"},
        "strict": {"type": ["boolean", "null"]},
    },
    "required": ["name"],
}
_CONSTRAINTS: dict[str, dict[str, Any]] = {
    "response_format": {
        "anyOf": [
            _NULL,
            {
                "type": "object",
                "properties": {"type": {"enum": ["text", "json_object"]}},
                "required": ["type"],
            },
            {
                "type": "object",
                "properties": {
                    "type": {"const": "json_schema"},
                    "json_schema": _JSON_SCHEMA_FORMAT,
                },
                "required": ["type", "json_schema"],
            },
        ],
        "description": "text, any JSON object, or JSON that follows a JSON Schema.",
    },
    "structured_outputs": {
        "anyOf": [
            _NULL,
            {
                "type": "object",
                "properties": {
                    "json": {"anyOf": [{"type": "object"}, {"type": "string"}, _NULL]},
                    "regex": {"type": ["string", "null"]},
                    "choice": {"anyOf": [{"type": "array", "items": {"type": "string"}}, _NULL]},
                    "grammar": {"type": ["string", "null"]},
                    "json_object": {"type": ["boolean", "null"]},
                },
            },
        ],
        "description": "vLLM's constraint of the output: exactly one of json (a JSON Schema), "
        "regex, choice, grammar (Lark or GBNF) or json_object.",
    },
}


class StreamOptions(OpenAIRequestModel):
    include_usage: bool | None = None


def _content_part_schema(schema: dict[str, Any]) -> None:
    schema["properties"]["text"].pop("default", None)
    schema["required"] = ["type", "text"]


class ContentPart(OpenAIRequestModel):
    """One part of a message's content; only {"type": "text"} parts are supported."""

    # Other part types carry fields of their own (image_url, input_audio...): not worth a warning,
    # the part is rejected anyway.
    model_config = ConfigDict(
        extra="ignore",
        strict=True,
        json_schema_extra=_documented(
            {"type": {"const": "text"}, "text": {"type": "string"}},
            _content_part_schema,
        ),
    )

    type: str
    text: str | None = None


class FunctionCallParam(OpenAIRequestModel):
    """A call an earlier assistant turn made: `arguments` is JSON text, passed on as it is."""

    name: str
    arguments: str


class ToolCallParam(OpenAIRequestModel):
    id: str
    type: Literal["function"]
    function: FunctionCallParam


class ChatMessageParam(OpenAIRequestModel):
    """One turn. Content may be null for an assistant turn that calls tools; a tool turn names the
    call it answers; role "function" (legacy) answers an assistant's legacy `function_call`."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCallParam | None = None


class SamplingExtras(OpenAIRequestModel):
    """Sampling and stopping fields of chat and completions, with the vLLM/FastChat extras."""

    model: str
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    # OpenAI allows any 64-bit seed; negative ones are folded into the worker's unsigned range.
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    user: str | None = None
    # Extras, as vLLM and FastChat accept them. top_k -1 or 0 means no limit.
    top_k: int | None = Field(default=None, ge=-1, le=UINT32_MAX)
    min_p: float | None = Field(default=None, ge=0, le=1)
    # Smaller ones overflow the sampler's float32 arithmetic (the worker refuses below 2**-7).
    repetition_penalty: float | None = Field(default=None, ge=0.01)
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(default=None, ge=0, le=UINT32_MAX)
    # Token id (a string) -> bias; checked by translation.logit_bias.
    logit_bias: dict[str, Any] | None = None
    # Output constraints (structured.py): OpenAI's response_format, vLLM's structured_outputs and
    # its older guided_* fields. At most one of them.
    response_format: Any = None
    structured_outputs: Any = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # Accepted for vLLM clients and ignored (one grammar backend, its own whitespace rules).
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None


def _top_logprobs_needs_logprobs(schema: dict[str, Any]) -> None:
    schema["if"] = {
        "properties": {"top_logprobs": {"type": "integer"}},
        "required": ["top_logprobs"],
    }
    schema["then"] = {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}


class FunctionDefinition(OpenAIRequestModel):
    # OpenAI's rule for function names (ToolDefinition.name in worker.proto).
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    # The JSON Schema of the arguments; absent means none.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


def _tool_schema(schema: dict[str, Any]) -> None:
    schema["properties"]["type"] = {"const": "function"}
    _without_null(schema["properties"]["function"])
    schema["required"] = ["type", "function"]


class ToolParam(OpenAIRequestModel):
    """A tool the model may call; only function tools exist here (tools.py refuses others)."""

    # Other tool types carry fields of their own: the tool is refused anyway.
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra=_tool_schema)

    type: str
    function: FunctionDefinition | None = None


class FunctionName(OpenAIRequestModel):
    name: str


class NamedToolChoice(OpenAIRequestModel):
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingExtras):
    model_config = ConfigDict(
        json_schema_extra=_documented(
            {
                **_LOGIT_BIAS,
                **_CONSTRAINTS,
                "audio": _unsupported(),
                "modalities": _unsupported(["text"]),
                "prediction": _unsupported(),
                "reasoning_effort": _unsupported(),
                "web_search_options": _unsupported(),
            },
            _top_logprobs_needs_logprobs,
        )
    )

    messages: list[ChatMessageParam] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # Tool calling (tools.py); functions and function_call are the legacy spelling.
    tools: list[ToolParam] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDefinition] | None = None
    function_call: Literal["none", "auto"] | FunctionName | None = None
    # vLLM's extra: variables for the chat template, e.g. {"enable_thinking": false}.
    chat_template_kwargs: dict[str, Any] | None = None
    # Unsupported: rejected when set (see serving_chat._reject_unsupported_chat).
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None


CompletionPrompt = str | list[str] | list[TokenId] | list[list[TokenId]]


def _check_batch_size(value: CompletionPrompt, n: int = 1) -> CompletionPrompt:
    """A list of prompts (not of token ids) is a batch: at most MAX_PROMPTS, and n per prompt at
    most MAX_CHOICES in all."""
    if isinstance(value, str) or not value or isinstance(value[0], int):
        return value
    if len(value) > MAX_PROMPTS:
        raise PydanticCustomError(
            "too_many_prompts",
            "at most {limit} items may be sent at once, got {count}",
            {"limit": MAX_PROMPTS, "count": len(value)},
        )
    if len(value) * n > MAX_CHOICES:
        raise PydanticCustomError(
            "too_many_choices",
            "n ({n}) times {count} prompts asks for more than {limit} completions",
            {"n": n, "count": len(value), "limit": MAX_CHOICES},
        )
    return value


class CompletionRequest(SamplingExtras):
    model_config = ConfigDict(
        json_schema_extra=_documented(
            {
                **_LOGIT_BIAS,
                **_CONSTRAINTS,
                # best_of may also equal n: left as an integer.
                "suffix": {"anyOf": [_NULL, {"type": "string", "maxLength": 0}]},
            },
            lambda schema: _non_empty_lists(schema["properties"]["prompt"], max_items=MAX_CHOICES),
        )
    )

    prompt: CompletionPrompt
    # 0 only with echo: the prompt is scored (its logprobs) and nothing generated.
    max_tokens: int | None = Field(default=None, ge=0, le=UINT32_MAX)
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # Unsupported: rejected when set (see serving_completions._reject_unsupported_completion).
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _bounded_batch(cls, value: CompletionPrompt, info: ValidationInfo) -> CompletionPrompt:
        # `n` is declared (so validated) before `prompt`; absent when it was invalid.
        return _check_batch_size(value, info.data.get("n") or 1)


def _embedding_input_schema(schema: dict[str, Any]) -> None:
    # Texts only: token id inputs are refused (serving_embeddings._embedding_inputs).
    text_input = schema["properties"]["input"]
    text_input["anyOf"] = [
        branch
        for branch in text_input["anyOf"]
        if branch.get("type") == "string" or branch.get("items", {}).get("type") == "string"
    ]
    _non_empty_lists(text_input, max_items=MAX_PROMPTS)


class EmbeddingRequest(OpenAIRequestModel):
    model_config = ConfigDict(
        json_schema_extra=_documented({"dimensions": _unsupported()}, _embedding_input_schema)
    )

    model: str
    input: CompletionPrompt
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None
    # Unsupported: rejected when set.
    dimensions: int | None = None

    @field_validator("input")
    @classmethod
    def _bounded_batch(cls, value: CompletionPrompt) -> CompletionPrompt:
        return _check_batch_size(value)


# --- FastChat's extra routes (fastchat_routes.py) ----------------------------------------------


class FastChatChatCompletionRequest(ChatCompletionRequest):
    """POST /api/v1/chat/completions: as /v1/chat/completions, but `messages` may also be a string
    (one user message), as FastChat's APIChatCompletionRequest allows."""

    @model_validator(mode="before")
    @classmethod
    def _one_user_message(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("messages"), str):
            return {**data, "messages": [{"role": "user", "content": data["messages"]}]}
        return data


class EngineEmbeddingRequest(EmbeddingRequest):
    """POST /v1/engines/{model}/embeddings: `model` may be left out (the path names it then)."""

    model: str = ""


class TokenCheckItem(OpenAIRequestModel):
    model: str
    prompt: str
    max_tokens: int = Field(ge=0, le=UINT32_MAX)


class TokenCheckRequest(OpenAIRequestModel):
    """POST /api/v1/token_check: does each prompt plus its max_tokens fit the model's context?"""

    prompts: list[TokenCheckItem] = Field(max_length=MAX_PROMPTS)


def _field_names(*models: type[BaseModel]) -> frozenset[str]:
    return frozenset(name for model in models for name in model.model_fields)


# Every field name a request body may hold, to tell field names from union tags in error paths.
REQUEST_FIELD_NAMES = _field_names(
    ChatCompletionRequest,
    ChatMessageParam,
    FunctionCallParam,
    ToolCallParam,
    FunctionDefinition,
    ToolParam,
    FunctionName,
    NamedToolChoice,
    ContentPart,
    StreamOptions,
    CompletionRequest,
    EmbeddingRequest,
    TokenCheckRequest,
    TokenCheckItem,
)


# --- responses ---------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error the gateway returns (errors.APIError.body)."""

    error: ErrorDetail


class HealthStatus(BaseModel):
    status: Literal["ok", "unavailable"]


class PromptTokensDetails(BaseModel):
    # Prompt tokens whose keys and values came from the worker's prefix cache.
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "chatfleet"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


def _omitted_when_none(value: Any) -> bool:
    return value is None


# A response member left out of the JSON when it is None (and still described by the document).
_OMITTED_WHEN_NONE: Any = Field(default=None, exclude_if=_omitted_when_none)


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """The answer: content is null when the model only called tools; tool_calls and
    reasoning_content are left out when there are none."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = _OMITTED_WHEN_NONE
    reasoning_content: str | None = _OMITTED_WHEN_NONE


class ChatCompletionChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaFunctionCall(BaseModel):
    name: str | None = _OMITTED_WHEN_NONE
    arguments: str | None = _OMITTED_WHEN_NONE


class DeltaToolCall(BaseModel):
    """A piece of a streamed tool call: id, type and name only on the call's first piece."""

    index: int
    id: str | None = _OMITTED_WHEN_NONE
    type: Literal["function"] | None = _OMITTED_WHEN_NONE
    function: DeltaFunctionCall


class DeltaMessage(BaseModel):
    """A streamed change; unset members are left out, so the last chunk's delta is `{}`."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler: Any) -> dict[str, Any]:
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatCompletionStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    # Only sent when the client asked for stream_options.include_usage: null on every chunk but the
    # last, which has no choices.
    usage: UsageInfo | None = None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    # A list of floats, or base64 of their little-endian float32 bytes.
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class TokenCheckResult(BaseModel):
    """One prompt's answer, in FastChat's camelCase."""

    fits: bool
    tokenCount: int
    contextLength: int


class TokenCheckResponse(BaseModel):
    prompts: list[TokenCheckResult]
