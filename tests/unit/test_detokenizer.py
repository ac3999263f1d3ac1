"""Incremental detokenization matches a full decode, for byte-level BPE and SentencePiece."""

from __future__ import annotations

import random

import pytest
from models import build_byte_level_tokenizer, build_sentencepiece_tokenizer
from transformers import PreTrainedTokenizerFast

from services.worker.engine.detokenizer import (
    IncrementalDetokenizer,
    byte_fallback_ids,
    make_decode_fn,
)

TEXTS = [
    "Hello world",
    "Café crème brûlée — naïve",
    "日本語 and 中文 and 한국어",
    "emoji 🙂🚀 👍🏽 end",
    "  leading spaces and\nnew lines\n\n",
]


@pytest.fixture(scope="module", params=["byte-level", "sentencepiece"])
def tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    if request.param == "byte-level":
        return build_byte_level_tokenizer()
    return build_sentencepiece_tokenizer()


def full_decode(tokenizer: PreTrainedTokenizerFast, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def stream(tokenizer: PreTrainedTokenizerFast, prompt: list[int], output: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(make_decode_fn(tokenizer), prompt, byte_fallback_ids(tokenizer))
    return [detok.step(t) for t in output] + [detok.flush()]


def expected_completion(
    tokenizer: PreTrainedTokenizerFast, prompt: list[int], output: list[int]
) -> str:
    full = full_decode(tokenizer, prompt + output)
    return full[len(full_decode(tokenizer, prompt)) :]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("prompt_text", ["", "Say:", "The end is near."])
def test_real_text_streams_exactly(
    tokenizer: PreTrainedTokenizerFast, text: str, prompt_text: str
) -> None:
    prompt = tokenizer.encode(prompt_text, add_special_tokens=False) if prompt_text else []
    output = tokenizer.encode(text, add_special_tokens=False)
    pieces = stream(tokenizer, prompt, output)
    assert "".join(pieces) == expected_completion(tokenizer, prompt, output)
    # A split character is held back: no piece carries a replacement character.
    assert all("\ufffd" not in piece for piece in pieces)


def test_random_token_streams_match_the_full_decode(tokenizer: PreTrainedTokenizerFast) -> None:
    rng = random.Random(7)
    vocab = len(tokenizer)
    # Bias towards pieces of multibyte text so split characters are common.
    multibyte = tokenizer.encode("".join(TEXTS[1:4]), add_special_tokens=False)
    prompt = tokenizer.encode("Prompt text.", add_special_tokens=False)
    for _ in range(60):
        output = [
            rng.choice(multibyte) if rng.random() < 0.6 else rng.randrange(vocab)
            for _ in range(rng.randrange(1, 40))
        ]
        assert "".join(stream(tokenizer, prompt, output)) == expected_completion(
            tokenizer, prompt, output
        )


def test_split_characters_are_held_until_complete() -> None:
    tokenizer = build_byte_level_tokenizer()
    assert byte_fallback_ids(tokenizer) == frozenset()
    ids = tokenizer.encode("Café 🙂 日本語", add_special_tokens=False)
    detok = IncrementalDetokenizer(make_decode_fn(tokenizer))
    pieces = [detok.step(t) for t in ids]
    assert "" in pieces  # some token ended mid-character and waited for the next
    assert "".join(pieces) == "Café 🙂 日本語"


def test_byte_fallback_runs_are_decoded_as_a_whole() -> None:
    tokenizer = build_sentencepiece_tokenizer()
    byte_ids = byte_fallback_ids(tokenizer)
    assert len(byte_ids) == 256
    # "日" is not in the vocabulary: it falls back to three byte tokens.
    ids = tokenizer.encode("a 日 b", add_special_tokens=False)
    assert sum(t in byte_ids for t in ids) == 3
    detok = IncrementalDetokenizer(make_decode_fn(tokenizer), (), byte_ids)
    pieces = [detok.step(t) for t in ids]
    assert "".join(pieces) == "a 日 b"
    first_after = max(i for i, t in enumerate(ids) if t in byte_ids) + 1
    assert pieces[first_after].startswith("日")  # released with the first token after the run
    # An ASCII byte followed by a stray continuation byte: the decoder rejects the whole run.
    stray = [tokenizer.convert_tokens_to_ids(t) for t in ["<0x41>", "<0x82>"]]
    detok = IncrementalDetokenizer(make_decode_fn(tokenizer), (), byte_ids)
    text = "".join(detok.step(t) for t in stray) + detok.flush()
    assert text == full_decode(tokenizer, stray)


def test_long_streams_only_decode_a_window() -> None:
    tokenizer = build_byte_level_tokenizer()
    calls: list[int] = []
    decode = make_decode_fn(tokenizer)

    def counting(ids: list[int]) -> str:
        calls.append(len(ids))
        return decode(ids)

    detok = IncrementalDetokenizer(counting, [])
    output = tokenizer.encode("Hello world, the quick brown fox. " * 40, add_special_tokens=False)
    text = "".join(detok.step(t) for t in output)
    assert text == full_decode(tokenizer, output)
    assert max(calls) <= 8  # never the whole output


def test_kept_markers_survive_skipping_special_tokens() -> None:
    """Mistral flags [TOOL_CALLS] as special: the tool parser must still see it, while the
    other special tokens (EOS here) are dropped as before."""
    tokenizer = build_byte_level_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    marker = tokenizer.convert_tokens_to_ids("[TOOL_CALLS]")
    words = tokenizer.encode("call it", add_special_tokens=False)
    ids = [*words, marker, *words, tokenizer.eos_token_id]
    plain = make_decode_fn(tokenizer)
    keeping = make_decode_fn(tokenizer, keep=["[TOOL_CALLS]", "<|python_tag|>"])
    assert "[TOOL_CALLS]" not in plain(ids)
    assert keeping(ids) == "call it[TOOL_CALLS]call it"
    assert keeping(words) == plain(words)
