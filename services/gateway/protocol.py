"""Pydantic models of the OpenAI HTTP API as the gateway speaks it: requests and responses.

Request models validate types and ranges strictly (JSON mode: "1" is not a number, "yes" is not a
boolean). Unknown fields are logged and ignored; fields OpenAI defines that chatfleet cannot honour
are declared here and rejected with a 400 by serving.py.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

logger = logging.getLogger(__name__)

MAX_N = 128
MAX_TOP_LOGPROBS = 20
_UINT32_MAX = 2**32 - 1

TokenId = Annotated[int, Field(ge=0, le=_UINT32_MAX)]


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


class StreamOptions(OpenAIRequestModel):
    include_usage: bool | None = None


class ContentPart(OpenAIRequestModel):
    """One part of a message's content; only {"type": "text"} parts are supported."""

    # Other part types carry fields of their own (image_url, input_audio...): not worth a warning,
    # the part is rejected anyway.
    model_config = ConfigDict(extra="ignore", strict=True)

    type: str
    text: str | None = None


class ChatMessageParam(OpenAIRequestModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # Unsupported (no tool calling): rejected when set.
    tool_calls: Any = None
    tool_call_id: Any = None
    function_call: Any = None


class SamplingExtras(OpenAIRequestModel):
    """Sampling and stopping fields of chat and completions, with the vLLM/FastChat extras."""

    model: str
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=_UINT32_MAX)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    # OpenAI allows any 64-bit seed; negative ones are folded into the worker's unsigned range.
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    user: str | None = None
    # Extras, as vLLM and FastChat accept them. top_k -1 or 0 means no limit.
    top_k: int | None = Field(default=None, ge=-1, le=_UINT32_MAX)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    stop_token_ids: list[TokenId] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = Field(default=None, ge=0, le=_UINT32_MAX)
    # Unsupported: rejected when set to anything but a neutral value.
    logit_bias: dict[str, Any] | None = None


class ChatCompletionRequest(SamplingExtras):
    messages: list[ChatMessageParam] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=_UINT32_MAX)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # Unsupported: rejected when set (see serving.unsupported_chat_param).
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None


CompletionPrompt = str | list[str] | list[TokenId] | list[list[TokenId]]


class CompletionRequest(SamplingExtras):
    prompt: CompletionPrompt
    echo: bool | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # Unsupported: rejected when set (see serving.unsupported_completion_param).
    suffix: str | None = None
    best_of: int | None = None


class EmbeddingRequest(OpenAIRequestModel):
    model: str
    input: CompletionPrompt
    encoding_format: Literal["float", "base64"] | None = None
    user: str | None = None
    # Unsupported: rejected when set.
    dimensions: int | None = None


def _field_names(*models: type[BaseModel]) -> frozenset[str]:
    return frozenset(name for model in models for name in model.model_fields)


# Every field name a request body may hold, to tell field names from union tags in error paths.
REQUEST_FIELD_NAMES = _field_names(
    ChatCompletionRequest,
    ChatMessageParam,
    ContentPart,
    StreamOptions,
    CompletionRequest,
    EmbeddingRequest,
)


# --- responses ---------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


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


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


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


class DeltaMessage(BaseModel):
    """A streamed change; unset members are left out, so the last chunk's delta is `{}`."""

    role: Literal["assistant"] | None = None
    content: str | None = None

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
