"""The results as tables: per model (turn 1, turn 2, average, unparsed judgments), per category,
and pairwise win rates, computed from the judgment files as FastChat's show_result.py does."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from rich.markup import escape
from rich.table import Table

from services.eval.judge import match_outcome
from services.eval.records import Record

UNPARSED = -1


@dataclass(frozen=True)
class ModelScores:
    """show_result.py's single mode: means over the judgments with a rating."""

    model: str
    turn_1: float | None
    turn_2: float | None
    average: float | None  # over all rated judgments, both turns (its "Average" table)
    rated: int
    unparsed: int  # judgments recorded with score -1 (no [[rating]])


@dataclass(frozen=True)
class PairScores:
    """show_result.py's pairwise mode, for one model against the baseline."""

    model: str
    baseline: str
    win: int
    loss: int
    tie: int
    errors: int  # matches where a game had no [[A]]/[[B]]/[[C]] verdict

    @property
    def matches(self) -> int:
        return self.win + self.loss + self.tie

    @property
    def win_rate(self) -> float | None:
        return self.win / self.matches if self.matches else None

    @property
    def loss_rate(self) -> float | None:
        return self.loss / self.matches if self.matches else None

    @property
    def win_rate_adjusted(self) -> float | None:
        """Each tie counts half a win."""
        return (self.win + 0.5 * self.tie) / self.matches if self.matches else None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _latest_single(records: Iterable[Record]) -> list[Record]:
    """One judgment per (question, model, turn): the last written wins."""
    latest: dict[tuple[object, object, object], Record] = {}
    for record in records:
        latest[(record.get("question_id"), record.get("model"), record.get("turn"))] = record
    return list(latest.values())


def single_scores(
    records: Iterable[Record], models: Sequence[str] | None = None
) -> list[ModelScores]:
    """Per model, best average first (models without a rating last)."""
    by_model: dict[str, list[Record]] = defaultdict(list)
    for record in _latest_single(records):
        by_model[str(record["model"])].append(record)
    names = list(models) if models is not None else sorted(by_model)
    rows = []
    for model in names:
        judged = by_model.get(model, [])
        rated = [r for r in judged if float(r["score"]) != UNPARSED]
        rows.append(
            ModelScores(
                model=model,
                turn_1=_mean([float(r["score"]) for r in rated if int(r["turn"]) == 1]),
                turn_2=_mean([float(r["score"]) for r in rated if int(r["turn"]) == 2]),
                average=_mean([float(r["score"]) for r in rated]),
                rated=len(rated),
                unparsed=len(judged) - len(rated),
            )
        )
    return sorted(rows, key=lambda row: (row.average is None, -(row.average or 0.0)))


def category_scores(
    records: Iterable[Record], categories: Mapping[int, str]
) -> dict[str, dict[str, float | None]]:
    """category -> model -> mean rating over both turns (the numbers of FastChat's radar plot);
    None where every judgment of that category was unparsed."""
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for record in _latest_single(records):
        category = categories.get(int(record["question_id"]))
        if category is None:
            continue
        cell = scores[category][str(record["model"])]
        if float(record["score"]) != UNPARSED:
            cell.append(float(record["score"]))
    order = list(dict.fromkeys(categories.values()))
    return {
        category: {model: _mean(values) for model, values in scores[category].items()}
        for category in order
        if category in scores
    }


def pair_scores(records: Iterable[Record], baseline: str) -> list[PairScores]:
    """Win/loss/tie of each model against `baseline`, best adjusted win rate first."""
    latest: dict[tuple[object, ...], Record] = {}
    for record in records:
        key = (record.get("question_id"), record.get("model_1"), record.get("model_2"))
        latest[(*key, record.get("turn"))] = record
    tally: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for record in latest.values():
        model_1, model_2 = str(record["model_1"]), str(record["model_2"])
        if baseline not in (model_1, model_2) or model_1 == model_2:
            continue
        model = model_2 if model_1 == baseline else model_1
        outcome = match_outcome(str(record["g1_winner"]), str(record["g2_winner"]))
        if outcome == "error":
            tally[model]["errors"] += 1
        elif outcome == "tie":
            tally[model]["tie"] += 1
        else:
            winner = model_1 if outcome == "model_1" else model_2
            tally[model]["win" if winner == model else "loss"] += 1
    rows = [
        PairScores(
            model=model,
            baseline=baseline,
            win=counts["win"],
            loss=counts["loss"],
            tie=counts["tie"],
            errors=counts["errors"],
        )
        for model, counts in tally.items()
    ]
    return sorted(rows, key=lambda row: -(row.win_rate_adjusted or 0.0))


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def single_table(rows: Sequence[ModelScores], judge: str) -> Table:
    table = Table(title=f"MT-bench single-answer grading (judge: {escape(judge)})")
    table.add_column("model")
    for column in ("turn 1", "turn 2", "average", "rated", "unparsed"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            escape(row.model),
            _score(row.turn_1),
            _score(row.turn_2),
            _score(row.average),
            str(row.rated),
            str(row.unparsed),
        )
    return table


def category_table(
    scores: Mapping[str, Mapping[str, float | None]], models: Sequence[str]
) -> Table:
    table = Table(title="MT-bench score per category (both turns)")
    table.add_column("category")
    for model in models:
        table.add_column(escape(model), justify="right")
    for category, by_model in scores.items():
        table.add_row(category, *(_score(by_model.get(model)) for model in models))
    return table


def pair_table(rows: Sequence[PairScores], judge: str) -> Table:
    baseline = rows[0].baseline if rows else "?"
    table = Table(title=f"MT-bench pairwise against {escape(baseline)} (judge: {escape(judge)})")
    table.add_column("model")
    for column in ("win", "loss", "tie", "win rate", "adjusted", "no verdict"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(
            escape(row.model),
            str(row.win),
            str(row.loss),
            str(row.tie),
            _rate(row.win_rate),
            _rate(row.win_rate_adjusted),
            str(row.errors),
        )
    return table
