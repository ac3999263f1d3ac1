"""Structured output: compile an OutputConstraint (JSON Schema, regex, choice, Lark/GBNF grammar)
into an llguidance matcher, and mask the logits of constrained rows to the tokens it allows.

Compilation runs on the engine's tokenizer thread, before a request is admitted, so a bad schema
is refused with InvalidRequestError(param="constraint") and never reaches the engine thread.
Each sequence gets its own copy of a cached, never-advanced matcher; the engine thread fills and
applies masks for constrained rows only, so unconstrained rows of a batch are left untouched.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.gbnf_to_lark

if TYPE_CHECKING:  # a typing-only name of the extension's stub
    from llguidance._lib import JsonCompileOptions
import llguidance.hf
import llguidance.torch as lt
import torch

from services.common.errors import InvalidRequestError
from services.worker.engine.interface import ConstraintKind, OutputConstraint

CONSTRAINT_PARAM = "constraint"
# Compiled grammars kept per engine: agents reuse a handful of schemas over and over.
DEFAULT_CACHE_SIZE = 128
# A schema with a JSON string property: its first mask builds llguidance's lexer for the
# tokenizer (seconds, once per tokenizer), which engine warm-up pays instead of a request.
WARM_UP_CONSTRAINT = OutputConstraint(
    ConstraintKind.JSON_SCHEMA,
    spec='{"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}',
)


class ConstraintError(RuntimeError):
    """A sequence's matcher rejected a token it had allowed (an llguidance bug): the request fails
    rather than return text outside the requested language."""


class SequenceConstraint:
    """One sequence's position in its grammar. Held by its SamplingState; kept across preemption
    (output tokens are never resampled, so the matcher stays where it is)."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher
        self.error: str | None = None

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        lt.fill_next_token_bitmask(self._matcher, bitmask, row)

    def consume(self, token_id: int) -> None:
        """Advance past the sampled token; on failure `error` says why."""
        if self.error is not None:
            return
        if not self._matcher.consume_token(token_id) or self._matcher.is_error():
            self.error = self._matcher.get_error() or f"token {token_id} was not allowed"

    @property
    def is_stopped(self) -> bool:
        """The grammar is complete: nothing but EOS may follow."""
        return self._matcher.is_stopped()


@dataclass
class CompilerStats:
    hits: int = 0
    misses: int = 0


class ConstraintCompiler:
    """Compiles and validates constraints for one tokenizer, with an LRU cache of the results
    keyed by (kind, spec, choices). Thread-safe; compile on the tokenizer thread."""

    def __init__(
        self, tokenizer: llguidance.LLTokenizer, *, cache_size: int = DEFAULT_CACHE_SIZE
    ) -> None:
        self._tokenizer = tokenizer
        self._cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str, tuple[str, ...]], llguidance.LLMatcher] = (
            OrderedDict()
        )
        self._lock = threading.Lock()
        self.stats = CompilerStats()

    @classmethod
    def for_hf_tokenizer(cls, hf_tokenizer: Any, vocab_size: int) -> ConstraintCompiler:
        """`vocab_size`: the width of the model's logits (may exceed the tokenizer's length)."""
        return cls(llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size))

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.vocab_size)

    def compile(self, constraint: OutputConstraint) -> SequenceConstraint:
        """A fresh matcher for one sequence; InvalidRequestError(param="constraint") when the
        constraint is malformed or uses what llguidance does not implement."""
        key = (constraint.kind.value, constraint.spec, tuple(constraint.choices))
        with self._lock:
            template = self._cache.get(key)
            if template is not None:
                self._cache.move_to_end(key)
                self.stats.hits += 1
        if template is None:
            template = self._compile(constraint)
            with self._lock:
                self.stats.misses += 1
                self._cache[key] = template
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return SequenceConstraint(template.deep_copy())

    def _compile(self, constraint: OutputConstraint) -> llguidance.LLMatcher:
        grammar = _grammar(constraint)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self._tokenizer
        )
        if is_error:
            raise InvalidRequestError(
                f"invalid {constraint.kind.value} constraint: {'; '.join(messages)}",
                param=CONSTRAINT_PARAM,
            )
        matcher = llguidance.LLMatcher(self._tokenizer, grammar)
        if matcher.is_error():
            raise InvalidRequestError(
                f"invalid {constraint.kind.value} constraint: {matcher.get_error()}",
                param=CONSTRAINT_PARAM,
            )
        return matcher


# JSON on one line with fixed separators, as OpenAI's structured outputs read: free whitespace
# lets a small model spend its whole budget on newlines inside a valid object. A schema may still
# ask for other layout with its own "x-guidance" options.
_JSON_LAYOUT: JsonCompileOptions = {"whitespace_flexible": False}


def _grammar(constraint: OutputConstraint) -> str:
    """llguidance's grammar text for a constraint."""
    kind = constraint.kind
    if kind is ConstraintKind.JSON_OBJECT:
        return llguidance.LLMatcher.grammar_from_json_schema(
            '{"type": "object"}', defaults=_JSON_LAYOUT
        )
    if kind is ConstraintKind.JSON_SCHEMA:
        try:
            json.loads(constraint.spec)
        except ValueError as exc:
            raise InvalidRequestError(
                f"the JSON schema is not valid JSON: {exc}", param=CONSTRAINT_PARAM
            ) from exc
        return llguidance.LLMatcher.grammar_from_json_schema(constraint.spec, defaults=_JSON_LAYOUT)
    if kind is ConstraintKind.REGEX:
        if not constraint.spec:
            raise InvalidRequestError("the regex constraint is empty", param=CONSTRAINT_PARAM)
        return llguidance.LLMatcher.grammar_from_regex(constraint.spec)
    if kind is ConstraintKind.CHOICE:
        return llguidance.LLMatcher.grammar_from_lark(_choice_lark(constraint.choices))
    if kind is ConstraintKind.GRAMMAR:
        spec = constraint.spec
        if not spec.strip():
            raise InvalidRequestError("the grammar is empty", param=CONSTRAINT_PARAM)
        if "::=" in spec:  # GBNF (llama.cpp's grammar format)
            try:
                spec = llguidance.gbnf_to_lark.gbnf_to_lark(spec)
            except Exception as exc:  # the converter raises assorted parse errors
                raise InvalidRequestError(
                    f"invalid GBNF grammar: {exc}", param=CONSTRAINT_PARAM
                ) from exc
        return llguidance.LLMatcher.grammar_from_lark(spec)
    raise InvalidRequestError(f"unknown constraint kind {kind}", param=CONSTRAINT_PARAM)


def _choice_lark(choices: Sequence[str]) -> str:
    """A Lark grammar matching exactly one of the choices; JSON string literals are Lark's."""
    if not choices:
        raise InvalidRequestError("choice needs at least one alternative", param=CONSTRAINT_PARAM)
    if any(choice == "" for choice in choices):
        raise InvalidRequestError("choices must not be empty strings", param=CONSTRAINT_PARAM)
    return "start: " + " | ".join(json.dumps(choice) for choice in dict.fromkeys(choices))


class TokenMasker:
    """One bitmask buffer, reused across steps, and the time spent on masks.

    Used by the engine thread only. Masks are applied with plain tensor ops (llguidance's own
    applier is torch.compile'd, which costs a compile at first use and per batch shape)."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size  # the matchers' vocabulary: the bitmask's width in bits
        self._bitmask: torch.Tensor | None = None
        self._shifts = torch.arange(32, dtype=torch.int32)
        self.seconds = 0.0

    def apply(self, logits: torch.Tensor, rows: Sequence[tuple[int, SequenceConstraint]]) -> None:
        """Set to -inf, in place, the logits each constrained row's grammar forbids next."""
        if not rows:
            return
        started = time.perf_counter()
        n, vocab = len(rows), logits.shape[1]
        bitmask = self._bitmask
        if bitmask is None or bitmask.shape[0] < n:
            bitmask = self._bitmask = lt.allocate_token_bitmask(max(n, 4), self.vocab_size)
        for j, (_, constraint) in enumerate(rows):
            constraint.fill(bitmask, j)
        words = bitmask[:n]
        if words.device != logits.device:
            words = words.to(logits.device)
        if self._shifts.device != logits.device:
            self._shifts = self._shifts.to(logits.device)
        # Bit k of word w allows token 32w + k; each row is masked in place, in its own view.
        banned = (((words.unsqueeze(-1) >> self._shifts) & 1) == 0).reshape(n, -1)
        width = min(vocab, banned.shape[1])
        for j, (i, _) in enumerate(rows):
            row = logits[i]
            row[:width].masked_fill_(banned[j, :width], float("-inf"))
            row[width:] = float("-inf")  # logits wider than the tokenizer: never allowed
        self.seconds += time.perf_counter() - started
