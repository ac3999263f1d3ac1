"""When a sequence ends, and what text it may release meanwhile: `advance` applies the stopping
rules (stop tokens, stop strings, min_tokens, max_tokens, a completed grammar) to each sampled
token; `StopStringMatcher` holds back text that might be the start of a stop string until the next
pieces show whether it is, so no part of a stop string is ever released."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from services.worker.engine.constraints import ConstraintError
from services.worker.engine.interface import FinishReason, TokenLogprob

if TYPE_CHECKING:
    from services.worker.engine.sequence import QueueItem, SequenceState

logger = logging.getLogger(__name__)


def advance(seq: SequenceState, token_id: int, logprob: TokenLogprob | None) -> QueueItem | None:
    """Append the sampled token to `seq` and apply the stopping rules; a chunk when there is
    news (the final one sets `seq.finished`), or the error that ends the sequence."""
    seq.output_ids.append(token_id)
    seq.pending_ids.append(token_id)
    if logprob is not None:
        seq.pending_logprobs.append(logprob)
    constraint = seq.sampling.constraint
    if constraint is not None and constraint.error is not None:
        seq.finished = True
        logger.error(
            "structured output failed for %s: %s",
            seq.request_id,
            constraint.error,
            extra={"request_id": seq.request_id},
        )
        return ConstraintError(f"structured output failed: {constraint.error}")
    n = len(seq.output_ids)
    ends_by_token = token_id in seq.stop_ids and n >= seq.min_tokens
    # A complete grammar ends the output as EOS would.
    ends_by_grammar = constraint is not None and constraint.is_stopped and not ends_by_token
    ends_by_length = n >= seq.max_tokens
    if ends_by_token:
        delta = seq.detokenizer.flush()  # a stop token's own text is never returned
    else:
        delta = seq.detokenizer.step(token_id)
        if ends_by_length or ends_by_grammar:
            delta += seq.detokenizer.flush()
    text, matched = seq.matcher.feed(delta, active=n >= seq.min_tokens)
    if matched is not None:
        return seq.final_chunk(text, FinishReason.STOP, matched)
    if ends_by_token:
        reason = str(token_id) if token_id in seq.stop_token_ids else ""
        return seq.final_chunk(text + seq.matcher.flush(), FinishReason.STOP, reason)
    if ends_by_grammar:
        return seq.final_chunk(text + seq.matcher.flush(), FinishReason.STOP)
    if ends_by_length:
        return seq.final_chunk(text + seq.matcher.flush(), FinishReason.LENGTH)
    if not text:
        return None  # keep the ids with the text they will produce
    return seq.take_chunk(text)


class StopStringMatcher:
    """Feed text deltas in order; each call returns what is safe to release now."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in dict.fromkeys(stops) if s)
        # Every proper prefix of a stop string: the suffixes worth holding back.
        self._prefixes = {s[:i] for s in self._stops for i in range(1, len(s))}
        self._longest_prefix = max((len(p) for p in self._prefixes), default=0)
        self._held = ""

    @property
    def held(self) -> str:
        return self._held

    def feed(self, text: str, *, active: bool = True) -> tuple[str, str | None]:
        """Add `text`; return (text to release, the stop string matched or None).

        When a stop string matches, the text before it is released and the rest is dropped: the
        caller ends the sequence. With `active=False` (min_tokens not reached yet) stop strings
        are not looked for and everything, including held-back text, is released.
        """
        if not self._stops:
            return text, None
        buffer = self._held + text
        if not active:
            self._held = ""
            return buffer, None
        first: tuple[int, str] | None = None
        for stop in self._stops:
            at = buffer.find(stop)
            if at >= 0 and (first is None or at < first[0]):
                first = (at, stop)
        if first is not None:
            self._held = ""
            return buffer[: first[0]], first[1]
        keep = 0
        for size in range(min(len(buffer), self._longest_prefix), 0, -1):
            if buffer[-size:] in self._prefixes:
                keep = size
                break
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], None

    def flush(self) -> str:
        """Release held-back text: generation ended without completing a stop string."""
        held, self._held = self._held, ""
        return held
