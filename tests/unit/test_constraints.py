"""Structured output on its own: compiling constraints with llguidance, the compile cache, and
the masked sampler producing only text of the requested language (random logits, real tokenizer)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from models import build_byte_level_tokenizer
from transformers import PreTrainedTokenizerFast

from services.common.errors import InvalidRequestError
from services.worker.engine.constraints import ConstraintCompiler, TokenMasker
from services.worker.engine.interface import ConstraintKind, OutputConstraint, SamplingParams
from services.worker.engine.sampling import SamplingState, sample

VOCAB = 520  # wider than the tokenizer (512): ids past it must never be allowed

SCHEMA = {
    "type": "object",
    "properties": {
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "tag": {"enum": ["red", "green"]},
    },
    "required": ["n", "ok", "tag"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_byte_level_tokenizer()


@pytest.fixture
def compiler(tokenizer: PreTrainedTokenizerFast) -> ConstraintCompiler:
    return ConstraintCompiler.for_hf_tokenizer(tokenizer, VOCAB)


def run(
    compiler: ConstraintCompiler,
    tokenizer: PreTrainedTokenizerFast,
    constraint: OutputConstraint,
    *,
    seed: int,
    max_tokens: int = 80,
) -> tuple[str, bool]:
    """Sample from random logits under the constraint: the text and whether the grammar ended
    (stopped, or EOS where it accepts)."""
    torch.manual_seed(seed)
    row = SamplingState(
        SamplingParams(temperature=1.0, seed=seed),
        vocab_size=VOCAB,
        constraint=compiler.compile(constraint),
    )
    masker = TokenMasker(compiler.vocab_size)
    ids: list[int] = []
    for _ in range(max_tokens):
        out = sample(torch.randn(1, VOCAB) * 3, [row], masker)
        token = out.token_ids[0]
        assert token < len(tokenizer)
        assert row.constraint is not None and row.constraint.error is None
        if token == tokenizer.eos_token_id:
            return tokenizer.decode(ids), True
        ids.append(token)
        if row.constraint.is_stopped:
            return tokenizer.decode(ids), True
    return tokenizer.decode(ids), False


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_output_parses_and_validates(
    compiler: ConstraintCompiler, tokenizer: PreTrainedTokenizerFast, seed: int
) -> None:
    constraint = OutputConstraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA))
    text, ended = run(compiler, tokenizer, constraint, seed=seed)
    assert ended
    value = json.loads(text)
    assert set(value) == {"n", "ok", "tag"}
    assert isinstance(value["n"], int) and 0 <= value["n"] <= 99
    assert isinstance(value["ok"], bool) and value["tag"] in ("red", "green")


def test_json_object_and_regex_and_choice(
    compiler: ConstraintCompiler, tokenizer: PreTrainedTokenizerFast
) -> None:
    regex = OutputConstraint(ConstraintKind.REGEX, r"[a-c]{2,5}-\d\d")
    text, ended = run(compiler, tokenizer, regex, seed=3)
    assert ended and re.fullmatch(r"[a-c]{2,5}-\d\d", text)
    choices = ("yes", "no", 'say "maybe"\\')
    choice = OutputConstraint(ConstraintKind.CHOICE, choices=choices)
    for seed in range(4):
        text, ended = run(compiler, tokenizer, choice, seed=seed)
        assert ended and text in choices
    obj = OutputConstraint(ConstraintKind.JSON_OBJECT)
    text, ended = run(compiler, tokenizer, obj, seed=5, max_tokens=300)
    if ended:  # random logits may leave a long object open; what exists must be an object prefix
        assert isinstance(json.loads(text), dict)
    assert text.lstrip().startswith("{")


def test_lark_and_gbnf_grammars(
    compiler: ConstraintCompiler, tokenizer: PreTrainedTokenizerFast
) -> None:
    lark = OutputConstraint(ConstraintKind.GRAMMAR, 'start: "a" ("," "a")* "!"')
    text, ended = run(compiler, tokenizer, lark, seed=0)
    assert ended and re.fullmatch(r"a(,a)*!", text)
    gbnf = OutputConstraint(ConstraintKind.GRAMMAR, 'root ::= "up" | "down"')
    text, ended = run(compiler, tokenizer, gbnf, seed=0)
    assert ended and text in ("up", "down")


def test_compiled_grammars_are_cached(compiler: ConstraintCompiler) -> None:
    constraint = OutputConstraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA))
    first = compiler.compile(constraint)
    second = compiler.compile(OutputConstraint(ConstraintKind.JSON_SCHEMA, json.dumps(SCHEMA)))
    assert compiler.stats.misses == 1 and compiler.stats.hits == 1
    assert first is not second  # each sequence advances its own copy
    first.consume(_first_allowed(first, compiler))
    assert not second.is_stopped and second.error is None


def _first_allowed(constraint: object, compiler: ConstraintCompiler) -> int:
    masker = TokenMasker(compiler.vocab_size)
    logits = torch.zeros(1, VOCAB)
    masker.apply(logits, [(0, constraint)])  # type: ignore[list-item]
    return int(torch.isfinite(logits[0]).nonzero()[0])


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        (
            OutputConstraint(ConstraintKind.JSON_SCHEMA, '{"not": {"type": "string"}}'),
            "Unimplemented keys",
        ),
        (OutputConstraint(ConstraintKind.JSON_SCHEMA, "{not json"), "not valid JSON"),
        (OutputConstraint(ConstraintKind.REGEX, "(unclosed"), ""),
        (OutputConstraint(ConstraintKind.CHOICE), "at least one"),
        (OutputConstraint(ConstraintKind.GRAMMAR, "start: undefined_rule"), ""),
    ],
)
def test_bad_constraints_are_invalid_requests(
    compiler: ConstraintCompiler, constraint: OutputConstraint, message: str
) -> None:
    with pytest.raises(InvalidRequestError) as err:
        compiler.compile(constraint)
    assert err.value.param == "constraint"
    assert message in err.value.message


def test_mask_touches_only_constrained_rows(compiler: ConstraintCompiler) -> None:
    constraint = compiler.compile(OutputConstraint(ConstraintKind.REGEX, "[0-9]+"))
    logits = torch.randn(3, VOCAB)
    before = logits.clone()
    masker = TokenMasker(compiler.vocab_size)
    masker.apply(logits, [(1, constraint)])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed and all(i < 512 for i in allowed)
    assert masker.seconds > 0
