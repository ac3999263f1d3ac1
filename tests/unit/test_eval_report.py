"""The MT-bench report: the means FastChat's show_result.py computes (unparsed judgments left out
and counted), per category, pairwise win rates; the record formats its readers expect; files left
by an interrupted run."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from services.eval.data import find_data_dir
from services.eval.records import (
    answer_path,
    answer_record,
    append_record,
    judgment_path,
    pair_judgment_record,
    read_records,
    single_judgment_record,
    sort_answers,
)
from services.eval.report import category_scores, pair_scores, single_scores


def _single(qid: int, model: str, turn: int, score: float) -> dict[str, Any]:
    return single_judgment_record(
        question_id=qid,
        model=model,
        judge_model="judge",
        prompt_name="single-v1",
        user_prompt="p",
        judgment="j",
        score=score,
        turn=turn,
    )


def _pair(qid: int, m1: str, m2: str, g1: str, g2: str, turn: int = 1) -> dict[str, Any]:
    return pair_judgment_record(
        question_id=qid,
        model_1=m1,
        model_2=m2,
        g1_winner=g1,
        g2_winner=g2,
        judge_model="judge",
        prompt_name="pair-v2",
        g1_user_prompt="p1",
        g1_judgment="j1",
        g2_user_prompt="p2",
        g2_judgment="j2",
        turn=turn,
    )


SINGLE = [
    _single(1, "a", 1, 8),
    _single(1, "a", 2, 6),
    _single(2, "a", 1, 10),
    _single(2, "a", 2, -1),  # unparsed
    _single(1, "b", 1, -1),
    _single(1, "b", 2, -1),
    _single(2, "b", 1, 4),
    _single(2, "b", 2, 5.5),
]


def test_single_scores_leave_unparsed_out_and_count_them() -> None:
    rows = {row.model: row for row in single_scores(SINGLE)}
    a, b = rows["a"], rows["b"]
    assert (a.turn_1, a.turn_2) == (9.0, 6.0)
    assert a.average == pytest.approx(24 / 3)  # over the rated judgments, not the turn means
    assert (a.rated, a.unparsed) == (3, 1)
    assert (b.turn_1, b.turn_2, b.average) == (4.0, 5.5, 4.75)
    assert (b.rated, b.unparsed) == (2, 2)
    assert [row.model for row in single_scores(SINGLE)] == ["a", "b"]  # best first


def test_single_scores_of_a_model_without_any_rating() -> None:
    (row,) = single_scores([_single(1, "c", 1, -1)], ["c"])
    assert (row.turn_1, row.turn_2, row.average, row.rated, row.unparsed) == (
        None,
        None,
        None,
        0,
        1,
    )


def test_a_later_judgment_of_the_same_turn_replaces_the_earlier() -> None:
    (row,) = single_scores([_single(1, "a", 1, -1), _single(1, "a", 1, 9)])
    assert (row.average, row.unparsed) == (9.0, 0)


def test_category_scores() -> None:
    scores = category_scores(SINGLE, {1: "math", 2: "writing"})
    assert list(scores) == ["math", "writing"]
    assert scores["math"] == {"a": 7.0, "b": None}
    assert scores["writing"] == {"a": 10.0, "b": 4.75}


def test_pair_scores_with_the_swap_rule() -> None:
    records = [
        _pair(1, "a", "base", "model_1", "model_1"),  # a wins both orders
        _pair(2, "a", "base", "model_2", "model_2"),  # base wins
        _pair(3, "a", "base", "model_1", "model_2"),  # inconsistent: tie
        _pair(4, "a", "base", "tie", "tie"),
        _pair(5, "a", "base", "error", "model_1"),  # no verdict: left out, counted
        _pair(1, "base", "c", "model_2", "model_2"),  # the baseline as model_1: c wins
        _pair(1, "x", "y", "model_1", "model_1"),  # not against the baseline
    ]
    rows = {row.model: row for row in pair_scores(records, "base")}
    assert set(rows) == {"a", "c"}
    a = rows["a"]
    assert (a.win, a.loss, a.tie, a.errors) == (1, 1, 2, 1)
    assert a.win_rate == 0.25 and a.loss_rate == 0.25
    assert a.win_rate_adjusted == 0.5
    assert (rows["c"].win, rows["c"].win_rate_adjusted) == (1, 1.0)


def test_record_fields_match_fastchat(tmp_path: Path) -> None:
    answer = answer_record(81, "org/model", ["one", "two"])
    assert set(answer) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
    assert answer["choices"] == [{"index": 0, "turns": ["one", "two"]}]
    single = _single(81, "m", 2, 7)
    assert set(single) == {
        "question_id", "model", "judge", "user_prompt", "judgment", "score", "turn", "tstamp"
    }  # fmt: skip
    assert single["judge"] == ["judge", "single-v1"]
    pair = _pair(81, "m", "base", "model_1", "tie")
    assert set(pair) == {
        "question_id", "model_1", "model_2", "g1_winner", "g2_winner", "judge", "g1_user_prompt",
        "g1_judgment", "g2_user_prompt", "g2_judgment", "turn", "tstamp",
    }  # fmt: skip
    # A slash in a model name does not make a folder (as FastChat's gen_judgment.py).
    assert answer_path(tmp_path, "org/model").name == "org--model.jsonl"
    assert judgment_path(tmp_path, "org/judge", "single").name == "org--judge_single.jsonl"


def test_a_line_cut_short_by_an_interrupted_run_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "model_answer" / "m.jsonl"
    append_record(path, answer_record(82, "m", ["a", "b"]))
    append_record(path, answer_record(81, "m", ["c", "d"]))
    with path.open("a") as file:
        file.write('{"question_id": 83, "answer_id": "x", "choi')
    records = read_records(path)
    assert [r["question_id"] for r in records] == [82, 81]
    # The file is repaired, so the next append starts on a line of its own.
    append_record(path, answer_record(83, "m", ["e", "f"]))
    sort_answers(path)
    assert [r["question_id"] for r in read_records(path)] == [81, 82, 83]
    assert all(json.loads(line) for line in path.read_text().splitlines())


def _show_result() -> Any:
    """FastChat's own show_result.py, from the installed package (it needs pandas)."""
    pytest.importorskip("pandas")
    path = next(find_data_dir().parent.glob("scripts/show_result.py"))
    spec = importlib.util.spec_from_file_location("fastchat_show_result", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fastchat_show_result_reads_our_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    show_result = _show_result()
    single_file = judgment_path(tmp_path, "judge", "single")
    for record in SINGLE:
        append_record(single_file, record)
    show_result.display_result_single(
        argparse.Namespace(input_file=str(single_file), model_list=None)
    )
    printed = capsys.readouterr().out
    # Its "Average" table: a 8.00 (24/3), b 4.75, the -1 scores left out as ours are.
    average = printed.split("Average")[1]
    assert "8.0" in average and "4.75" in average
    ours = {row.model: row.average for row in single_scores(SINGLE)}
    assert ours == {"a": 8.0, "b": 4.75}

    pair_file = judgment_path(tmp_path, "judge", "pair")
    for record in (
        _pair(1, "a", "base", "model_1", "model_1"),
        _pair(2, "a", "base", "model_1", "model_2"),
        _pair(3, "a", "base", "error", "model_1"),
    ):
        append_record(pair_file, record)
    show_result.display_result_pairwise(
        argparse.Namespace(input_file=str(pair_file), model_list=None, baseline_model="base")
    )
    printed = capsys.readouterr().out
    (row,) = pair_scores(read_records(pair_file), "base")
    assert row.win_rate_adjusted == 0.75
    assert "0.75" in printed  # its win_rate_adjusted column agrees
