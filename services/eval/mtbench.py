"""One MT-bench run: pick the models, answer through the gateway, judge, report, record.

Every phase resumes from the files of the run before: answers and judgments on disk are kept and
not asked for again, so an interrupted or failed run is finished by running it again."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services.eval.answers import AnswerSummary, generate_answers
from services.eval.client import ChatEndpoint, RetryPolicy
from services.eval.config import EvalConfig
from services.eval.data import BenchData, Question, load_bench
from services.eval.errors import EvalError, UnknownModelError
from services.eval.judge import Judge, judge_pairs, judge_single, pair_matches, single_matches
from services.eval.leaderboard import LeaderboardError, record_scores
from services.eval.records import ANSWER_DIR, JUDGMENT_DIR, judgment_path, read_records
from services.eval.report import (
    ModelScores,
    PairScores,
    category_scores,
    category_table,
    pair_scores,
    pair_table,
    single_scores,
    single_table,
)


class JudgingError(EvalError):
    """The judge failed after the answers were written: they stay on disk for the next run."""


@dataclass
class RunResult:
    models: list[str]
    judge_model: str | None = None
    answers: list[AnswerSummary] = field(default_factory=list)
    single: list[ModelScores] = field(default_factory=list)
    pairs: list[PairScores] = field(default_factory=list)
    answer_seconds: float = 0.0
    judge_seconds: float = 0.0
    recorded: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ModelChoice:
    answering: list[str]
    # The served models known to chat (from the gateway's /api/models); None from a gateway that
    # does not say: then only the models that answered are known to.
    chat: list[str] | None


async def select_models(gateway: ChatEndpoint, config: EvalConfig) -> ModelChoice:
    """The models to answer: --models (each must be served), else every served chat model; the
    pairwise baseline joins them. Nothing is generated when a name is unknown."""
    served = await gateway.list_models()
    capabilities = await gateway.chat_capabilities()
    chat = [m for m in served if capabilities is None or capabilities.get(m, True)]
    wanted = list(config.models) or chat
    if config.pairwise and config.baseline_model and config.baseline_model not in wanted:
        wanted.append(config.baseline_model)
    unknown = [m for m in wanted if m not in served]
    if unknown:
        names = ", ".join(repr(m) for m in unknown)
        listing = ", ".join(served) or "no model yet"
        raise UnknownModelError(
            f"unknown model {names}: the gateway at {gateway.url} serves {listing} "
            "(--models, --baseline-model)"
        )
    if not wanted:
        raise UnknownModelError(f"the gateway at {gateway.url} serves no chat model yet")
    return ModelChoice(answering=wanted, chat=chat if capabilities is not None else None)


async def resolve_judge_model(
    judge: ChatEndpoint, config: EvalConfig, gateway_chat_models: Sequence[str]
) -> str:
    """--judge-model, else the first chat model the judge serves."""
    if config.judge_model:
        return config.judge_model
    if config.judge_is_gateway:
        models = list(gateway_chat_models)
    else:
        served = await judge.list_models()
        capabilities = await judge.chat_capabilities() or {}
        models = [m for m in served if capabilities.get(m, True)]
    if not models:
        raise UnknownModelError(f"the judge at {judge.url} serves no model: give --judge-model")
    return models[0]


class _Bars:
    """A rich progress bar per phase, on stderr so the tables on stdout stay clean."""

    def __init__(self, console: Console) -> None:
        self.console = console

    @contextlib.contextmanager
    def phase(self, description: str) -> Iterator[tuple[Callable[[], None], Callable[[int], None]]]:
        """(advance by one, set the total) for a bar shown while the context is open."""
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
        ) as progress:
            task = progress.add_task(description, total=None)
            yield (
                lambda: progress.advance(task),
                lambda total: progress.update(task, total=total),
            )


@contextlib.asynccontextmanager
async def _endpoints(config: EvalConfig) -> AsyncIterator[tuple[ChatEndpoint, ChatEndpoint]]:
    retry = RetryPolicy(attempts=config.retries, backoff_s=config.retry_backoff_s)
    gateway = ChatEndpoint(
        "gateway",
        config.gateway_url,
        config.api_key,
        key_hint=f"set the gateway's key in ${config.api_key_env} (--api-key-env names another)",
        retry=retry,
        timeout_s=config.request_timeout_s,
    )
    if config.judge_is_gateway:
        judge_url, judge_key = config.gateway_url, config.api_key
        hint = f"the judge is the gateway: set its key in ${config.api_key_env}"
    else:
        judge_url, judge_key = str(config.judge_url), config.judge_api_key
        hint = f"set the judge's key in ${config.judge_api_key_env} (--judge-api-key-env)"
    judge = ChatEndpoint(
        "judge",
        judge_url,
        judge_key,
        key_hint=hint,
        retry=retry,
        timeout_s=config.request_timeout_s,
    )
    try:
        yield gateway, judge
    finally:
        await gateway.aclose()
        await judge.aclose()


def _questions(bench: BenchData, config: EvalConfig) -> list[Question]:
    questions = list(bench.questions)
    return questions[: config.first_n] if config.first_n else questions


async def run_mt_bench(
    config: EvalConfig, out: Console, progress_console: Console | None = None
) -> RunResult:
    """The whole run; raises EvalError (one clear line) on what it cannot get past."""
    bench = load_bench(config.data_dir)
    questions = _questions(bench, config)
    slots = asyncio.Semaphore(config.concurrency)
    bars = _Bars(progress_console or Console(stderr=True))
    async with _endpoints(config) as (gateway, judge_endpoint):
        choice = await select_models(gateway, config)
        models = choice.answering
        result = RunResult(models=models)
        _say(
            out,
            f"MT-bench: {len(questions)} questions x {len(models)} model(s) "
            f"({', '.join(models)}), two turns each, up to {config.concurrency} requests in flight",
        )
        started = time.monotonic()
        with bars.phase("answers") as (advance, total):
            result.answers = await generate_answers(
                gateway,
                models,
                questions,
                config.output_dir,
                max_tokens=config.max_tokens,
                slots=slots,
                on_answer=advance,
                on_total=total,
            )
        result.answer_seconds = time.monotonic() - started
        _print_answer_summary(out, result, config.output_dir)
        answered = {s.model: s.answers for s in result.answers if s.skipped is None and s.answers}
        if not answered:
            raise EvalError("no model answered: nothing to judge")

        try:
            gateway_chat = choice.chat if choice.chat is not None else list(answered)
            result.judge_model = await resolve_judge_model(judge_endpoint, config, gateway_chat)
            judge = Judge(
                judge_endpoint,
                result.judge_model,
                bench,
                max_tokens=config.judge_max_tokens,
                slots=slots,
            )
            started = time.monotonic()
            await _judge(judge, config, questions, answered, bars)
            result.judge_seconds = time.monotonic() - started
        except EvalError as error:
            raise JudgingError(
                f"{error}; the answers are kept in {config.output_dir / ANSWER_DIR} "
                "(run the same command again to resume)"
            ) from error
    _say(out, f"judging with {result.judge_model}: {result.judge_seconds:.1f} s wall time")
    _report(out, result, config, questions, list(answered))
    if config.leaderboard_url and config.single:
        try:
            result.recorded = await record_scores(
                config.leaderboard_url, str(result.judge_model), result.single
            )
        except LeaderboardError as error:
            raise LeaderboardError(
                f"{error}; the judgments are kept in {config.output_dir / JUDGMENT_DIR}"
            ) from error
        _say(out, f"recorded the MT-bench scores of {', '.join(result.recorded) or 'no model'}")
    return result


async def _judge(
    judge: Judge,
    config: EvalConfig,
    questions: Sequence[Question],
    answered: dict[str, dict[int, list[str]]],
    bars: _Bars,
) -> None:
    if config.single:
        with bars.phase("single judgments") as (advance, total):
            await judge_single(
                judge,
                single_matches(questions, answered),
                judgment_path(config.output_dir, judge.model, "single"),
                on_judgment=advance,
                on_total=total,
            )
    if config.pairwise and config.baseline_model in answered:
        with bars.phase("pairwise judgments") as (advance, total):
            await judge_pairs(
                judge,
                pair_matches(questions, answered, str(config.baseline_model)),
                judgment_path(config.output_dir, judge.model, "pair"),
                on_judgment=advance,
                on_total=total,
            )


def _say(out: Console, text: str) -> None:
    """A line as written: model names and paths may hold [brackets] that rich reads as markup."""
    out.print(text, markup=False, highlight=False)


def _print_answer_summary(out: Console, result: RunResult, output_dir: Path) -> None:
    generated = sum(s.generated for s in result.answers)
    kept = sum(s.kept for s in result.answers)
    _say(
        out,
        f"answers: {generated} generated, {kept} kept from an earlier run, in "
        f"{result.answer_seconds:.1f} s wall time ({output_dir / ANSWER_DIR})",
    )
    for summary in result.answers:
        if summary.skipped is not None:
            _say(out, f"skipped {summary.model}: it cannot chat ({summary.skipped})")


def _report(
    out: Console,
    result: RunResult,
    config: EvalConfig,
    questions: Sequence[Question],
    models: list[str],
) -> None:
    judge = str(result.judge_model)
    question_ids = {q.question_id for q in questions}
    categories = {q.question_id: q.category for q in questions}
    if config.single:
        path = judgment_path(config.output_dir, judge, "single")
        records = [
            r
            for r in read_records(path)
            if r.get("question_id") in question_ids and r.get("model") in models
        ]
        result.single = single_scores(records, models)
        out.print(single_table(result.single, judge))
        out.print(category_table(category_scores(records, categories), models))
        unparsed = sum(row.unparsed for row in result.single)
        if unparsed:
            _say(
                out,
                f"{unparsed} judgment(s) gave no [[rating]]: recorded with score -1 in {path}, "
                "left out of the means",
            )
    if config.pairwise and config.baseline_model:
        path = judgment_path(config.output_dir, judge, "pair")
        records = [r for r in read_records(path) if r.get("question_id") in question_ids]
        result.pairs = pair_scores(records, config.baseline_model)
        out.print(pair_table(result.pairs, judge))
