"""Answers to MT-bench's two-turn questions from each model, through the gateway, many at once.

Turn 2 is asked with turn 1's question and answer before it; each question's temperature is its
category's (FastChat's temperature_config). An answer is appended to its file as soon as both
turns are done, and the answers already in the file are not asked again (resume)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from services.eval.client import ChatEndpoint, Message
from services.eval.data import Question
from services.eval.errors import RequestRejectedError
from services.eval.records import (
    answer_path,
    answer_record,
    append_record,
    read_records,
    sort_answers,
)
from services.eval.tasks import run_all

logger = logging.getLogger(__name__)


@dataclass
class AnswerSummary:
    """What the answer phase did for one model."""

    model: str
    kept: int = 0  # answers already on disk from an earlier run
    generated: int = 0
    # Why the model was left out: a model that cannot chat (an embedding model) answers 4xx.
    skipped: str | None = None
    answers: dict[int, list[str]] = field(default_factory=dict)  # question id -> turns


def pending_questions(
    path: Path, questions: Sequence[Question]
) -> tuple[dict[int, list[str]], list[Question]]:
    """The answers on disk (question id -> turns) and the questions still to answer."""
    done: dict[int, list[str]] = {}
    for record in read_records(path):
        try:
            turns = [str(turn) for turn in record["choices"][0]["turns"]]
            done[int(record["question_id"])] = turns
        except (KeyError, IndexError, TypeError, ValueError):
            continue  # not an answer record: answer that question again
    todo = [q for q in questions if len(done.get(q.question_id, ())) < len(q.turns)]
    return done, todo


async def generate_answers(
    gateway: ChatEndpoint,
    models: Sequence[str],
    questions: Sequence[Question],
    output_dir: Path,
    *,
    max_tokens: int,
    slots: asyncio.Semaphore,
    on_answer: Callable[[], None] = lambda: None,
    on_total: Callable[[int], None] = lambda total: None,
) -> list[AnswerSummary]:
    """Answer every pending (model, question); `slots` bounds the requests in flight."""
    summaries = {model: AnswerSummary(model) for model in models}
    jobs = []
    for model in models:
        done, todo = pending_questions(answer_path(output_dir, model), questions)
        summary = summaries[model]
        summary.answers.update(done)
        summary.kept = len(questions) - len(todo)
        jobs += [(summary, question) for question in todo]
    on_total(len(jobs))

    async def answer(summary: AnswerSummary, question: Question) -> None:
        if summary.skipped is not None:
            on_answer()
            return
        messages: list[Message] = []
        turns: list[str] = []
        try:
            # A slot per question, held for both turns (one request at a time each): started
            # questions finish before new ones start, so an interrupted run loses little.
            async with slots:
                for text in question.turns:
                    if summary.skipped is not None:
                        break
                    messages.append({"role": "user", "content": text})
                    reply = await gateway.complete(
                        summary.model,
                        messages,
                        temperature=question.temperature,
                        max_tokens=max_tokens,
                    )
                    messages.append({"role": "assistant", "content": reply})
                    turns.append(reply)
        except RequestRejectedError as error:
            if summary.skipped is None:
                summary.skipped = str(error)
                logger.warning("skipping %s: %s", summary.model, error)
        if len(turns) == len(question.turns):
            append_record(
                answer_path(output_dir, summary.model),
                answer_record(question.question_id, summary.model, turns),
            )
            summary.answers[question.question_id] = turns
            summary.generated += 1
        on_answer()

    await run_all(answer(summary, question) for summary, question in jobs)
    for model in models:
        path = answer_path(output_dir, model)
        if path.exists():
            sort_answers(path)
    return [summaries[model] for model in models]
