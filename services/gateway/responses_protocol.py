"""Pydantic models of the OpenAI Responses API (POST /v1/responses) as the gateway speaks it.

Requests: the top-level body is validated here (strict types, unknown fields logged and ignored, as
in protocol.py). `input` items, `tools` and `text.format` are typed unions whose members are told
apart by their `type`; responses.py picks the member and validates it, so a bad item is reported
on its own path (`input[2].call_id`) rather than as "matches none of the accepted types".

Responses and stream events mirror the openai SDK's types (openai.types.responses), field for
field where chatfleet has a value, so `client.responses.create` and `client.responses.stream`
parse them unmodified.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.common.limits import FUNCTION_NAME_PATTERN, MAX_TOP_LOGPROBS
from services.gateway.protocol import UINT32_MAX, OpenAIRequestModel

MAX_METADATA_KEYS = 16


# --- requests ------------------------------------------------------------------------------------


class InputTextPart(OpenAIRequestModel):
    """Text content of an input message; assistant turns sent back carry `output_text` parts."""

    type: Literal["input_text", "output_text"]
    text: str
    # Sent back with earlier output: accepted and dropped.
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class InputMessageItem(OpenAIRequestModel):
    """A turn of the conversation (`type` may be left out)."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputTextPart]
    id: str | None = None
    status: str | None = None
    phase: str | None = None


class FunctionCallItem(OpenAIRequestModel):
    """A function call the model made earlier: replayed as an assistant turn's tool call."""

    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(OpenAIRequestModel):
    """The result of a function call: replayed as a tool turn."""

    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputTextPart]
    id: str | None = None
    status: str | None = None


class FunctionToolParam(OpenAIRequestModel):
    """A function the model may call (the Responses shape: no nested `function` object)."""

    type: Literal["function"]
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    # The Responses API makes function tools strict unless told otherwise.
    strict: bool | None = None


class TextFormatText(OpenAIRequestModel):
    type: Literal["text"]


class TextFormatJSONObject(OpenAIRequestModel):
    type: Literal["json_object"]


class TextFormatJSONSchema(OpenAIRequestModel):
    model_config = ConfigDict(populate_by_name=True)

    type: Literal["json_schema"]
    # OpenAI names schemas by the rule of function names.
    name: str = Field(pattern=FUNCTION_NAME_PATTERN)
    # `schema` would shadow a BaseModel attribute: the field is `schema_`, spelled `schema` in JSON.
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfigParam(OpenAIRequestModel):
    # A dict here: responses.py validates it as one of the TextFormat* models, by its `type`.
    format: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningParam(OpenAIRequestModel):
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesRequest(OpenAIRequestModel):
    """POST /v1/responses. Stateless: nothing is stored (`store` is accepted and ignored), so
    `previous_response_id` and `conversation` are refused (responses.py)."""

    model: str
    # A string (one user message) or a list of items, each checked by responses.py.
    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=UINT32_MAX)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    # Each checked by responses.py: only {"type": "function", ...} tools are supported.
    tools: list[Any] | None = None
    # "none" | "auto" | "required" | {"type": "function", "name": ...}: checked by responses.py.
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    text: TextConfigParam | None = None
    stream: bool | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=MAX_METADATA_KEYS)
    user: str | None = None
    store: bool | None = None
    reasoning: ReasoningParam | None = None
    # Accepted and ignored: they change nothing chatfleet does.
    include: list[str] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    stream_options: dict[str, Any] | None = None
    # Unsupported: refused when set (see responses._reject_unsupported).
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


def _field_names(*models: type[BaseModel]) -> frozenset[str]:
    names = set()
    for model in models:
        for name, info in model.model_fields.items():
            names.add(info.alias or name)
    return frozenset(names)


# Every field name of a Responses request body, to tell field names from union tags in error paths.
RESPONSES_FIELD_NAMES = _field_names(
    ResponsesRequest,
    TextConfigParam,
    ReasoningParam,
    InputTextPart,
    InputMessageItem,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionToolParam,
    TextFormatText,
    TextFormatJSONObject,
    TextFormatJSONSchema,
)


# --- responses -----------------------------------------------------------------------------------


class OutputTextPart(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str = ""
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class ReasoningTextPart(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str = ""


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: ItemStatus = "in_progress"
    content: list[OutputTextPart] = Field(default_factory=list)


class ReasoningItem(BaseModel):
    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[Any] = Field(default_factory=list)
    content: list[ReasoningTextPart] = Field(default_factory=list)
    status: ItemStatus = "in_progress"


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str = ""
    status: ItemStatus = "in_progress"


OutputItem = OutputMessage | ReasoningItem | OutputFunctionCall


class FunctionToolEcho(BaseModel):
    """A function tool as the response echoes the request's."""

    type: Literal["function"] = "function"
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool


class InputTokensDetails(BaseModel):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponsesUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"] | None = None


ResponseStatus = Literal["in_progress", "completed", "incomplete"]


class ResponseObject(BaseModel):
    """A response: its output items and usage, and the request's settings echoed back."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    error: None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    usage: ResponsesUsage | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[FunctionToolEcho] = Field(default_factory=list)
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    metadata: dict[str, str] = Field(default_factory=dict)
    user: str | None = None
    previous_response_id: None = None
    reasoning: None = None
    truncation: Literal["auto", "disabled"] = "disabled"


# --- stream events -------------------------------------------------------------------------------
# `sequence_number` is filled in as each event is sent (responses._numbered).


class ResponseLifecycleEvent(BaseModel):
    type: Literal[
        "response.created", "response.in_progress", "response.completed", "response.incomplete"
    ]
    sequence_number: int = 0
    response: ResponseObject


class OutputItemEvent(BaseModel):
    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int = 0
    output_index: int
    item: OutputItem


class ContentPartEvent(BaseModel):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int = 0
    item_id: str
    output_index: int
    content_index: int = 0
    part: OutputTextPart | ReasoningTextPart


class OutputTextDeltaEvent(BaseModel):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    sequence_number: int = 0
    item_id: str
    output_index: int
    content_index: int = 0
    delta: str
    logprobs: list[Any] = Field(default_factory=list)


class OutputTextDoneEvent(BaseModel):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    sequence_number: int = 0
    item_id: str
    output_index: int
    content_index: int = 0
    text: str
    logprobs: list[Any] = Field(default_factory=list)


class ReasoningTextDeltaEvent(BaseModel):
    type: Literal["response.reasoning_text.delta"] = "response.reasoning_text.delta"
    sequence_number: int = 0
    item_id: str
    output_index: int
    content_index: int = 0
    delta: str


class ReasoningTextDoneEvent(BaseModel):
    type: Literal["response.reasoning_text.done"] = "response.reasoning_text.done"
    sequence_number: int = 0
    item_id: str
    output_index: int
    content_index: int = 0
    text: str


class FunctionCallArgumentsDeltaEvent(BaseModel):
    type: Literal["response.function_call_arguments.delta"] = (
        "response.function_call_arguments.delta"
    )
    sequence_number: int = 0
    item_id: str
    output_index: int
    delta: str


class FunctionCallArgumentsDoneEvent(BaseModel):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    sequence_number: int = 0
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(BaseModel):
    """A failure after the stream started (the SDK's ResponseErrorEvent); the stream ends."""

    type: Literal["error"] = "error"
    sequence_number: int = 0
    code: str | None = None
    message: str
    param: str | None = None


StreamEvent = (
    ResponseLifecycleEvent
    | OutputItemEvent
    | ContentPartEvent
    | OutputTextDeltaEvent
    | OutputTextDoneEvent
    | ReasoningTextDeltaEvent
    | ReasoningTextDoneEvent
    | FunctionCallArgumentsDeltaEvent
    | FunctionCallArgumentsDoneEvent
    | ErrorEvent
)
