"""The generation core's interface: plain request/response types and the abstract Engine.

The servicer converts protobuf to these types; engines know nothing of gRPC.
"""

from __future__ import annotations

import abc
import asyncio
import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    """A function call the model made; `arguments` is JSON text."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatMessage:
    role: str  # system, user, assistant or tool
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant turn's calls
    tool_call_id: str = ""  # a tool turn's answer to this call
    name: str = ""


@dataclass(frozen=True)
class ToolDefinition:
    """A function the model may call; `parameters` is its arguments' JSON Schema (None: none)."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] | None = None
    strict: bool = False


@dataclass(frozen=True)
class Conversation:
    """Chat messages with what the chat template renders beside them: tools and extra variables."""

    messages: tuple[ChatMessage, ...]
    tools: tuple[ToolDefinition, ...] = ()
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)


# A chat prompt: plain messages, or a conversation with tools and template variables.
ChatPrompt = Sequence[ChatMessage] | Conversation
# A prompt is text, a chat prompt, or token ids.
Prompt = str | ChatPrompt | Sequence[int]


class ConstraintKind(enum.Enum):
    JSON_SCHEMA = "json_schema"  # spec: the schema as JSON text
    JSON_OBJECT = "json_object"  # any JSON object; spec unused
    REGEX = "regex"  # spec: the pattern
    CHOICE = "choice"  # choices: the alternatives
    GRAMMAR = "grammar"  # spec: Lark, or GBNF (rules written with ::=)


@dataclass(frozen=True)
class OutputConstraint:
    """The language the output must belong to; enforced by a token mask in the sampler."""

    kind: ConstraintKind
    spec: str = ""
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class StoppingParams:
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt: Prompt
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingParams = field(default_factory=StoppingParams)
    # None: no logprobs; k >= 0: the chosen token's logprob plus k alternatives.
    logprobs: int | None = None
    echo: bool = False
    # With echo: the echo chunk carries a logprob per prompt token (the first NaN) and `logprobs`
    # alternatives. With echo, max_tokens 0 scores the prompt and generates nothing.
    prompt_logprobs: bool = False
    constraint: OutputConstraint | None = None
    # (token id, bias added to its logit), bias in [-100, 100].
    logit_bias: tuple[tuple[int, float], ...] = ()


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"
    TOOL_CALLS = "tool_calls"  # set by the worker's output parsing, never by an engine


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a streamed tool call: the first piece of call `index` has its id and name."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class GenerationChunk:
    """One streamed piece. The last chunk of a request has finish_reason set."""

    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    is_prompt_echo: bool = False
    stop_reason: str = ""
    # Filled by the worker's output parsing (engine/output_parsing.py), not by engines.
    reasoning_text: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    # Set by engines on a request's first chunk when the rendered prompt leaves a reasoning block
    # open (prompts.EncodedPrompt.reasoning_open): the output then starts inside it.
    reasoning_open: bool = False
    # On the last chunk: prompt tokens whose keys and values came from the prefix cache.
    cached_prompt_tokens: int = 0


@dataclass(frozen=True)
class ModelDescription:
    name: str
    context_length: int
    supports_generate: bool
    supports_chat: bool
    supports_embeddings: bool
    aliases: tuple[str, ...] = ()
    source: str = ""
    # Applied to the sampling fields a request leaves unset (the model's recommended settings).
    default_sampling: SamplingParams = field(default_factory=SamplingParams)
    # How tool calls and reasoning are parsed from the output ("" for none): see output_parsing.
    tool_call_parser: str = ""
    reasoning_parser: str = ""


@dataclass(frozen=True)
class LoadInfo:
    running: int
    waiting: int
    capacity: int


@dataclass(frozen=True)
class EngineStats:
    """What a metrics scrape reads from an engine (services/worker/metrics.py): the load now, the
    KV cache use, and counters since start."""

    running: int
    waiting: int
    # Fraction (0..1) of the KV cache budget (--kv-cache-tokens) in use; None: no KV cache.
    kv_cache_usage: float | None = None
    prompt_tokens: int = 0  # prompt tokens prefilled (recomputations after preemption excluded)
    generation_tokens: int = 0  # tokens sampled
    preemptions: int = 0  # sequences sent back to the queue because the KV cache was full
    # Seconds the engine spent filling and applying structured-output token masks, and in steps
    # overall (forward, masks, sampling): their ratio is the masks' share of the step.
    structured_mask_seconds: float = 0.0
    step_seconds: float = 0.0
    # Prefix cache: tokens looked up in it (every admission, a resumed preemption included) and
    # tokens whose keys and values were found there instead of computed.
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0


class Engine(abc.ABC):
    """One loaded model. Heavy work runs off the event loop; every method here is safe to await
    from it. Raises services.common.errors types for bad input or overload."""

    @property
    @abc.abstractmethod
    def description(self) -> ModelDescription: ...

    @abc.abstractmethod
    async def start(self) -> None:
        """Load and warm the model. The worker reports SERVING only after every engine started."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Cancel or finish outstanding work and release the model."""

    async def drain(self) -> None:  # noqa: B027 - optional hook with a do-nothing default
        """Refuse new work (UnavailableError) and return once admitted work has finished.
        Callers bound it with a grace period, then call stop()."""

    async def failure(self) -> str:
        """Returns, with the reason, once the engine can no longer serve (its process died).
        The default never returns: an engine in the worker's own process fails with it."""
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")

    @abc.abstractmethod
    def load(self) -> LoadInfo: ...

    def stats(self) -> EngineStats:
        """Load and counters for metrics; engines without counters report their load only."""
        load = self.load()
        return EngineStats(running=load.running, waiting=load.waiting)

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream a completion. Closing the iterator (or cancelling the task that consumes it)
        cancels the request and frees its slot at the next step."""

    @abc.abstractmethod
    async def tokenize(self, prompt: str | ChatPrompt) -> list[int]: ...

    @abc.abstractmethod
    async def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """L2-normalised mean-pooled embeddings and the number of tokens read."""
