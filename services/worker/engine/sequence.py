"""One generation request as the engine thread sees it: its tokens, how far the model's cache
holds them, its sampling and stopping state, where its chunks go, and the chunks it makes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from services.worker.engine.interface import FinishReason, GenerationChunk, TokenLogprob

if TYPE_CHECKING:
    from services.worker.engine.detokenizer import IncrementalDetokenizer
    from services.worker.engine.sampling import SamplingState
    from services.worker.engine.stopping import StopStringMatcher

# What a request's queue carries: its chunks, or the error that ends it.
QueueItem = GenerationChunk | BaseException


@dataclass(eq=False)
class SequenceState:
    """One generation request as the engine thread sees it."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int  # already capped by the context window
    min_tokens: int
    stop_ids: frozenset[int]  # token ids that end the sequence (EOS unless ignore_eos, stop ids)
    stop_token_ids: frozenset[int]  # the request's own, reported as stop_reason
    sampling: SamplingState
    detokenizer: IncrementalDetokenizer
    matcher: StopStringMatcher
    # Where chunks go: the request's event loop and queue (None for nobody, e.g. tests).
    loop: asyncio.AbstractEventLoop | None
    queue: asyncio.Queue[QueueItem]
    output_ids: list[int] = field(default_factory=list)
    # Positions whose keys and values are in the runner's cache. Tokens past it are fed next:
    # the prompt in chunks, then one token per step; 0 again after a preemption.
    computed: int = 0
    cancelled: bool = False  # set from the event loop; the engine thread retires it next step
    finished: bool = False  # the final chunk was produced
    # Tokens whose text is still held back (incomplete character or possible stop string).
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_text: str = ""
    # Echo with prompt logprobs: the engine thread sends the echo chunk once every prompt token
    # is scored, then clears this.
    echo_pending: bool = False
    top_prompt_logprobs: int = 0  # alternatives per prompt token
    # One per prompt token scored so far (the first is NaN: nothing precedes it). Kept across a
    # preemption, so recomputing the prompt never scores or sends it again.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    # The prompt leaves a reasoning block open: said on the first chunk, for output parsing.
    reasoning_open: bool = False
    sent_any: bool = False
    # Prompt tokens the prefix cache supplied (reported on the last chunk), and whether the
    # cache was asked since the sequence last lost its cache row.
    cached_prompt_tokens: int = 0
    prefix_checked: bool = False

    @property
    def scoring_prompt(self) -> bool:
        """Whether the forward must return every prompt position's logits."""
        return self.echo_pending and len(self.prompt_logprobs) < len(self.prompt_ids)

    @property
    def length(self) -> int:
        """Prompt plus output tokens."""
        return len(self.prompt_ids) + len(self.output_ids)

    def pending_tokens(self, limit: int) -> list[int]:
        """Up to `limit` tokens not in the cache yet: a prompt chunk, the last sampled token, or
        after a preemption the prompt and the output so far."""
        start, n_prompt = self.computed, len(self.prompt_ids)
        end = min(self.length, start + limit)
        if start >= n_prompt:
            return self.output_ids[start - n_prompt : end - n_prompt]
        return self.prompt_ids[start:end] + self.output_ids[: max(0, end - n_prompt)]

    def lose_cache(self) -> None:
        """The runner dropped this sequence's keys and values (a preemption): everything is to be
        recomputed, starting from whatever prefix the prefix cache still holds."""
        self.computed = 0
        self.prefix_checked = False

    def final_chunk(
        self, text: str, reason: FinishReason, stop_reason: str = ""
    ) -> GenerationChunk:
        chunk = self.take_chunk(text)
        chunk.finish_reason = reason
        chunk.prompt_tokens = len(self.prompt_ids)
        chunk.completion_tokens = len(self.output_ids)
        chunk.cached_prompt_tokens = self.cached_prompt_tokens
        chunk.stop_reason = stop_reason
        self.finished = True
        return chunk

    def take_chunk(self, text: str) -> GenerationChunk:
        chunk = GenerationChunk(
            text=text, token_ids=self.pending_ids, logprobs=self.pending_logprobs
        )
        self.pending_ids, self.pending_logprobs = [], []
        return self.stamp(chunk)

    def echo_chunk(self) -> GenerationChunk:
        """The prompt sent back (with its logprobs once scored), before any output."""
        return self.stamp(
            GenerationChunk(
                text=self.prompt_text,
                token_ids=list(self.prompt_ids),
                logprobs=list(self.prompt_logprobs),
                is_prompt_echo=True,
                prompt_tokens=len(self.prompt_ids),
            )
        )

    def stamp(self, chunk: GenerationChunk) -> GenerationChunk:
        """Mark the request's first chunk with what the output parser must know up front."""
        if not self.sent_any:
            self.sent_any = True
            chunk.reasoning_open = self.reasoning_open
        return chunk
