"""LLM-as-judge grading as FastChat's gen_judgment.py does it: single-answer grading (a 1-10
[[rating]]) and pairwise comparison against a baseline with the positions swapped.

A judgment without a parseable verdict is recorded with score -1 (or winner "error"), exactly as
FastChat records it, and counted: it never stops the run."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from services.eval.client import ChatEndpoint, Message
from services.eval.data import BenchData, JudgePrompt, Question
from services.eval.errors import RequestRejectedError
from services.eval.records import (
    Record,
    append_record,
    pair_judgment_record,
    read_records,
    single_judgment_record,
)
from services.eval.tasks import run_all

# common.py's patterns: [[8]] or [[8.5]], else a single-bracketed [8].
_RATING = re.compile(r"\[\[(\d+\.?\d*)\]\]")
_RATING_BACKUP = re.compile(r"\[(\d+\.?\d*)\]")
UNPARSED = -1
# FastChat records an API failure as "$ERROR$" with score -1; the message follows here.
API_ERROR_OUTPUT = "$ERROR$"
JUDGE_TEMPERATURE = 0.0

Verdict = Literal["A", "B", "tie", "error"]
Winner = Literal["model_1", "model_2", "tie", "error"]


RATING_RANGE = (1.0, 10.0)


def parse_rating(judgment: str) -> float:
    """The judge's [[rating]], or -1 when there is none (common.py's process_judgement). A
    number off the 1-10 scale ([[100]] from a small judge) is no rating either: FastChat would
    average it in, which would let one confused judgment swamp the mean."""
    match = _RATING.search(judgment) or _RATING_BACKUP.search(judgment)
    if match is None:
        return UNPARSED
    text = match.group(1)
    value = float(text)  # unlike FastChat's literal_eval, float() takes "08" too
    if not RATING_RANGE[0] <= value <= RATING_RANGE[1]:
        return UNPARSED
    # FastChat keeps [[8]] an int and [[8.5]] a float.
    return int(value) if "." not in text else value


def parse_verdict(judgment: str) -> Verdict:
    """[[A]], [[B]] or [[C]] (a tie), checked in that order as common.py does."""
    if "[[A]]" in judgment:
        return "A"
    if "[[B]]" in judgment:
        return "B"
    if "[[C]]" in judgment:
        return "tie"
    return "error"


def game_winners(g1: Verdict, g2: Verdict) -> tuple[Winner, Winner]:
    """Map each game's A/B back to the models: game 1 shows model_1 as A, game 2 as B."""
    g1_map: dict[Verdict, Winner] = {"A": "model_1", "B": "model_2", "tie": "tie", "error": "error"}
    g2_map: dict[Verdict, Winner] = {"A": "model_2", "B": "model_1", "tie": "tie", "error": "error"}
    return g1_map[g1], g2_map[g2]


def match_outcome(g1_winner: str, g2_winner: str) -> Winner:
    """show_result.py's rule: a game without a verdict voids the match; a tie in game 1 or games
    that disagree (the judge followed the position, not the answer) make a tie."""
    if g1_winner == "error" or g2_winner == "error":
        return "error"
    if g1_winner == "tie" or g1_winner != g2_winner:
        return "tie"
    return "model_1" if g1_winner == "model_1" else "model_2"


def single_prompt_name(question: Question, turn: int) -> str:
    """gen_judgment.py's make_judge_single: *-math-* with the reference for math, reasoning and
    coding; the multi-turn prompt for turn 2."""
    name = "single-math-v1" if question.needs_reference else "single-v1"
    return f"{name}-multi-turn" if turn == 2 else name


def pair_prompt_name(question: Question, turn: int) -> str:
    """gen_judgment.py's make_judge_pairwise."""
    name = "pair-math-v1" if question.needs_reference else "pair-v2"
    return f"{name}-multi-turn" if turn == 2 else name


def _reference_fields(question: Question, turn: int) -> dict[str, str]:
    if not question.needs_reference or question.reference is None:
        return {}
    fields = {"ref_answer_1": question.reference[0]}
    if turn == 2:
        fields["ref_answer_2"] = question.reference[1]
    return fields


def single_user_prompt(
    prompt: JudgePrompt, question: Question, answer: Sequence[str], turn: int
) -> str:
    """common.py's create_conv_single."""
    if turn == 2:
        return prompt.prompt_template.format(
            question_1=question.turns[0],
            question_2=question.turns[1],
            answer_1=answer[0],
            answer_2=answer[1],
            **_reference_fields(question, turn),
        )
    return prompt.prompt_template.format(
        question=question.turns[0], answer=answer[0], **_reference_fields(question, turn)
    )


def pair_user_prompt(
    prompt: JudgePrompt,
    question: Question,
    answer_a: Sequence[str],
    answer_b: Sequence[str],
    turn: int,
) -> str:
    """common.py's run_judge_pair."""
    if turn == 2:
        return prompt.prompt_template.format(
            question_1=question.turns[0],
            question_2=question.turns[1],
            answer_a_1=answer_a[0],
            answer_b_1=answer_b[0],
            answer_a_2=answer_a[1],
            answer_b_2=answer_b[1],
            **_reference_fields(question, turn),
        )
    return prompt.prompt_template.format(
        question=question.turns[0],
        answer_a=answer_a[0],
        answer_b=answer_b[0],
        **_reference_fields(question, turn),
    )


@dataclass(frozen=True)
class SingleMatch:
    question: Question
    model: str
    answer: Sequence[str]
    turn: int

    @property
    def key(self) -> tuple[int, str, int]:
        return (self.question.question_id, self.model, self.turn)


@dataclass(frozen=True)
class PairMatch:
    question: Question
    model_1: str
    model_2: str
    answer_1: Sequence[str]
    answer_2: Sequence[str]
    turn: int

    @property
    def key(self) -> tuple[int, str, str, int]:
        return (self.question.question_id, self.model_1, self.model_2, self.turn)


def _turns(question: Question) -> list[int]:
    # gen_judgment.py grades turn 2 only for two-turn questions.
    return [1, 2] if len(question.turns) == 2 else [1]


def single_matches(
    questions: Sequence[Question], answers: Mapping[str, Mapping[int, Sequence[str]]]
) -> list[SingleMatch]:
    """Every (question, model, turn) with an answer; a missing answer is skipped, as FastChat
    allows absent responses."""
    return [
        SingleMatch(question, model, by_question[question.question_id], turn)
        for question in questions
        for model, by_question in answers.items()
        if question.question_id in by_question
        for turn in _turns(question)
    ]


def pair_matches(
    questions: Sequence[Question],
    answers: Mapping[str, Mapping[int, Sequence[str]]],
    baseline: str,
) -> list[PairMatch]:
    """gen_judgment.py's make_match: each model against the baseline (model_2)."""
    base = answers.get(baseline, {})
    return [
        PairMatch(question, model, baseline, by_question[qid], base[qid], turn)
        for question in questions
        if (qid := question.question_id) in base
        for model, by_question in answers.items()
        if model != baseline and qid in by_question
        for turn in _turns(question)
    ]


class Judge:
    """Asks the judge model for verdicts; `slots` bounds the requests in flight."""

    def __init__(
        self,
        endpoint: ChatEndpoint,
        model: str,
        bench: BenchData,
        *,
        max_tokens: int,
        slots: asyncio.Semaphore,
    ) -> None:
        self.endpoint = endpoint
        self.model = model
        self.bench = bench
        self.max_tokens = max_tokens
        self.slots = slots

    async def _ask(self, prompt: JudgePrompt, user_prompt: str) -> str:
        """The judge's reply. A request the judge refuses for this prompt alone (say, too long
        for its context) becomes FastChat's "$ERROR$" judgment; an unknown judge model, a bad
        key or an unreachable judge stop the run (the error propagates)."""
        messages: list[Message] = []
        if prompt.system_prompt:
            messages.append({"role": "system", "content": prompt.system_prompt})
        messages.append({"role": "user", "content": user_prompt})
        async with self.slots:
            try:
                return await self.endpoint.complete(
                    self.model, messages, temperature=JUDGE_TEMPERATURE, max_tokens=self.max_tokens
                )
            except RequestRejectedError as error:
                if error.status == 404:
                    raise
                return f"{API_ERROR_OUTPUT} {error}"

    async def grade_single(self, match: SingleMatch) -> Record:
        prompt = self.bench.prompt(single_prompt_name(match.question, match.turn))
        user_prompt = single_user_prompt(prompt, match.question, match.answer, match.turn)
        judgment = await self._ask(prompt, user_prompt)
        return single_judgment_record(
            question_id=match.question.question_id,
            model=match.model,
            judge_model=self.model,
            prompt_name=prompt.name,
            user_prompt=user_prompt,
            judgment=judgment,
            score=parse_rating(judgment),
            turn=match.turn,
        )

    async def grade_pair(self, match: PairMatch) -> Record:
        """Two games, the answers swapped between A and B in the second, so a judge that
        favours a position cannot decide the match."""
        prompt = self.bench.prompt(pair_prompt_name(match.question, match.turn))
        q, turn = match.question, match.turn
        g1_prompt = pair_user_prompt(prompt, q, match.answer_1, match.answer_2, turn)
        g2_prompt = pair_user_prompt(prompt, q, match.answer_2, match.answer_1, turn)
        g1_judgment, g2_judgment = await asyncio.gather(
            self._ask(prompt, g1_prompt), self._ask(prompt, g2_prompt)
        )
        g1_winner, g2_winner = game_winners(parse_verdict(g1_judgment), parse_verdict(g2_judgment))
        return pair_judgment_record(
            question_id=q.question_id,
            model_1=match.model_1,
            model_2=match.model_2,
            g1_winner=g1_winner,
            g2_winner=g2_winner,
            judge_model=self.model,
            prompt_name=prompt.name,
            g1_user_prompt=g1_prompt,
            g1_judgment=g1_judgment,
            g2_user_prompt=g2_prompt,
            g2_judgment=g2_judgment,
            turn=turn,
        )


def judged_single_keys(path: Path) -> set[tuple[int, str, int]]:
    """Judgments on disk, unparsed ones included: they are results, not gaps (resume)."""
    keys = set()
    for record in read_records(path):
        try:
            keys.add((int(record["question_id"]), str(record["model"]), int(record["turn"])))
        except (KeyError, TypeError, ValueError):
            continue
    return keys


def judged_pair_keys(path: Path) -> set[tuple[int, str, str, int]]:
    keys = set()
    for record in read_records(path):
        try:
            keys.add(
                (
                    int(record["question_id"]),
                    str(record["model_1"]),
                    str(record["model_2"]),
                    int(record["turn"]),
                )
            )
        except (KeyError, TypeError, ValueError):
            continue
    return keys


async def judge_single(
    judge: Judge,
    matches: Sequence[SingleMatch],
    path: Path,
    *,
    on_judgment: Callable[[], None] = lambda: None,
    on_total: Callable[[int], None] = lambda total: None,
) -> int:
    """Grade the matches not yet in `path`, appending each record as it comes; returns how
    many were graded now."""
    done = judged_single_keys(path)
    todo = [match for match in matches if match.key not in done]
    on_total(len(todo))

    async def grade(match: SingleMatch) -> None:
        append_record(path, await judge.grade_single(match))
        on_judgment()

    await run_all(grade(match) for match in todo)
    return len(todo)


async def judge_pairs(
    judge: Judge,
    matches: Sequence[PairMatch],
    path: Path,
    *,
    on_judgment: Callable[[], None] = lambda: None,
    on_total: Callable[[int], None] = lambda total: None,
) -> int:
    done = judged_pair_keys(path)
    todo = [match for match in matches if match.key not in done]
    on_total(len(todo))

    async def grade(match: PairMatch) -> None:
        append_record(path, await judge.grade_pair(match))
        on_judgment()

    await run_all(grade(match) for match in todo)
    return len(todo)
