"""FastChat's llm_judge file formats: model_answer/<model>.jsonl and
model_judgment/<judge>_single.jsonl / <judge>_pair.jsonl, written one line per finished item so
an interrupted run keeps them."""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

ANSWER_DIR = "model_answer"
JUDGMENT_DIR = "model_judgment"

Record = dict[str, Any]


def file_stem(name: str) -> str:
    """A model name as a file name: `org/model` would be a folder (FastChat's gen_judgment.py
    writes `--` for the slash too)."""
    return name.strip("/").replace("/", "--")


def answer_path(output_dir: Path, model: str) -> Path:
    return output_dir / ANSWER_DIR / f"{file_stem(model)}.jsonl"


def judgment_path(output_dir: Path, judge_model: str, kind: str) -> Path:
    """kind: "single" or "pair", as FastChat names the files."""
    return output_dir / JUDGMENT_DIR / f"{file_stem(judge_model)}_{kind}.jsonl"


def answer_record(question_id: int, model: str, turns: Sequence[str]) -> Record:
    """gen_model_answer.py's record: one choice holding the answer to each turn."""
    return {
        "question_id": question_id,
        "answer_id": uuid.uuid4().hex,
        "model_id": model,
        "choices": [{"index": 0, "turns": list(turns)}],
        "tstamp": time.time(),
    }


def single_judgment_record(
    *,
    question_id: int,
    model: str,
    judge_model: str,
    prompt_name: str,
    user_prompt: str,
    judgment: str,
    score: float,
    turn: int,
) -> Record:
    """play_a_match_single's record; score -1 when the judgment holds no [[rating]]."""
    return {
        "question_id": question_id,
        "model": model,
        "judge": [judge_model, prompt_name],
        "user_prompt": user_prompt,
        "judgment": judgment,
        "score": score,
        "turn": turn,
        "tstamp": time.time(),
    }


def pair_judgment_record(
    *,
    question_id: int,
    model_1: str,
    model_2: str,
    g1_winner: str,
    g2_winner: str,
    judge_model: str,
    prompt_name: str,
    g1_user_prompt: str,
    g1_judgment: str,
    g2_user_prompt: str,
    g2_judgment: str,
    turn: int,
) -> Record:
    """play_a_match_pair's record: game 1 shows model_1 as A, game 2 swaps the positions; the
    winners are already mapped back to "model_1"/"model_2" (or "tie", "error")."""
    return {
        "question_id": question_id,
        "model_1": model_1,
        "model_2": model_2,
        "g1_winner": g1_winner,
        "g2_winner": g2_winner,
        "judge": [judge_model, prompt_name],
        "g1_user_prompt": g1_user_prompt,
        "g1_judgment": g1_judgment,
        "g2_user_prompt": g2_user_prompt,
        "g2_judgment": g2_judgment,
        "turn": turn,
        "tstamp": time.time(),
    }


def read_records(path: Path) -> list[Record]:
    """The records of a JSON-lines file (none when it does not exist). A line cut short by an
    interrupted run is dropped, and the file rewritten without it, so appends start clean."""
    if not path.exists():
        return []
    records: list[Record] = []
    damaged = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            damaged += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            damaged += 1
    if damaged:
        logger.warning("%s: dropped %d damaged line(s) left by an interrupted run", path, damaged)
        write_records(path, records)
    return records


def append_record(path: Path, record: Record) -> None:
    """One line, flushed: what finished is on disk whatever happens next."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")


def write_records(path: Path, records: Iterable[Record]) -> None:
    """Replace the file's contents atomically (a crash leaves the old file or the new one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
    os.replace(partial, path)


def sort_answers(path: Path) -> None:
    """gen_model_answer.py's reorg_answer_file: one answer per question, in question order."""
    by_question = {record["question_id"]: record for record in read_records(path)}
    write_records(path, [by_question[qid] for qid in sorted(by_question)])
