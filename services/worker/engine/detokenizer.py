"""Incremental detokenization: turn a stream of token ids into text deltas, decoding only a short
window of recent tokens per step (vLLM's prefix/read offsets), never the whole output.

A token may end in the middle of a UTF-8 character (byte-level BPE): text is held back while the
window decodes to a trailing U+FFFD. SentencePiece byte-fallback tokens (<0xE6>) are held until the
run of them ends, because that decoder judges a run as a whole (one bad byte turns the whole run
into U+FFFDs). Leading spaces come out right because the window always starts a few tokens back,
so SentencePiece/Metaspace decoders see the token in context instead of stripping its space as
if it began the text.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

DecodeFn = Callable[[Sequence[int]], str]

# Prompt tokens decoded with the first output tokens, as context for spacing and split characters.
PROMPT_CONTEXT_TOKENS = 5
# Drop ids before the window once this many accumulate (keeps the window list short).
_TRIM_AT = 64
_REPLACEMENT = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def make_decode_fn(
    tokenizer: Any, *, skip_special_tokens: bool = True, keep: Iterable[str] = ()
) -> DecodeFn:
    """A fast ids -> text function: the Rust tokenizer directly when there is one.

    Tokenization-space clean-up (BERT's " ." -> ".") is not applied: it is not prefix-stable,
    so incremental text could not match the full decode with it. `keep` names special tokens whose
    text stays when the others are skipped: the markers output parsing reads ([TOOL_CALLS],
    <|python_tag|>, ...), which some tokenizers flag as special.
    """
    kept = _special_ids(tokenizer, keep) if skip_special_tokens else frozenset()
    if kept:
        dropped = _special_ids(tokenizer, None) - kept
        decode_all = make_decode_fn(tokenizer, skip_special_tokens=False)

        def decode_keeping(ids: Sequence[int]) -> str:
            return decode_all([i for i in ids if i not in dropped])

        return decode_keeping
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:

        def decode_fast(ids: Sequence[int]) -> str:
            return str(backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

        return decode_fast

    def decode_slow(ids: Sequence[int]) -> str:
        return str(
            tokenizer.decode(
                list(ids),
                skip_special_tokens=skip_special_tokens,
                clean_up_tokenization_spaces=False,
            )
        )

    return decode_slow


def _special_ids(tokenizer: Any, names: Iterable[str] | None) -> frozenset[int]:
    """Ids of the tokenizer's special tokens, or of those among them named in `names`."""
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", ())}
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            special.add(int(token_id))
    if names is None:
        return frozenset(special)
    wanted = set(names)
    return frozenset(i for i in special if tokenizer.convert_ids_to_tokens(i) in wanted)


def byte_fallback_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of <0xNN> tokens when the tokenizer's decoder has a ByteFallback step, else empty."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return frozenset()
    decoder = json.loads(backend.to_str()).get("decoder")
    if "ByteFallback" not in json.dumps(decoder):
        return frozenset()
    return frozenset(i for t, i in tokenizer.get_vocab().items() if _BYTE_TOKEN.fullmatch(t))


class IncrementalDetokenizer:
    """Feed token ids one at a time with `step`; `flush` at the end releases held-back text.

    The concatenation of every returned delta equals decode(prompt + output)[len(decode(prompt)):]
    for prompts that end on a whole character.
    """

    def __init__(
        self,
        decode: DecodeFn,
        prompt_ids: Sequence[int] = (),
        hold_after: Collection[int] = frozenset(),
    ) -> None:
        self._decode = decode
        self._hold_after = hold_after  # byte_fallback_ids(): wait for the run to end
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        # ids[prefix:read] is text already returned (kept as context); ids[read:] is pending.
        self._prefix = 0
        self._read = len(self._ids)
        self._prefix_text: str | None = None

    def step(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly "")."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        """Release whatever is held back (an incomplete character decodes to U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        if self._prefix_text is None:
            self._prefix_text = self._decode(self._ids[self._prefix : self._read])
        prefix_text = self._prefix_text
        if self._read == len(self._ids) or (not final and self._ids[-1] in self._hold_after):
            return ""
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(prefix_text) or (text.endswith(_REPLACEMENT) and not final):
            return ""  # a special token, or a character still missing bytes
        delta = text[len(prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = None
        if self._prefix >= _TRIM_AT:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return delta
