"""Ratings from arena votes: Bradley-Terry maximum likelihood with bootstrap confidence intervals,
as FastChat's leaderboard computes them now, and the online Elo it computed before.

Bradley-Terry: P(a beats b) = 1 / (1 + BASE ** ((R_b - R_a) / SCALE)), a tie counting as half a
win and half a loss (FastChat's `compute_elo_mle_with_tie`). The ratings maximise the likelihood
of the votes; they are found by Newton's method, so the same votes always give the same ratings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

ELO_SCALE = 400.0
ELO_BASE = 10.0
ELO_INITIAL = 1000.0
# Online Elo's K is larger than FastChat's 4 because an arena here sees few votes.
ELO_K = 32.0
# A weak L2 penalty on the ratings (in units of SCALE points). Without it a model that only ever
# won would have an infinite rating (FastChat's L-BFGS just stops after 100 steps instead); with
# it one win puts a model about 460 points above the loser rather than anywhere. It also fixes the
# free offset of Bradley-Terry: the ratings average INIT. Once votes pin the ratings down it
# hardly moves them (under half a point with 30 votes among 5 models, 0.01 with 300).
BT_L2 = 0.01
BOOTSTRAP_ROUNDS = 1000
BOOTSTRAP_SEED = 0
_NEWTON_TOLERANCE = 1e-11
_NEWTON_MAX_STEPS = 200

Floats = npt.NDArray[np.float64]


class Matchup(Protocol):
    """What the ratings need of a vote (services.leaderboard.store.Vote is one)."""

    @property
    def model_a(self) -> str: ...
    @property
    def model_b(self) -> str: ...
    @property
    def winner(self) -> str: ...


def _score_a(winner: str) -> float:
    """1 when model a won, 0 when model b did, 0.5 for a tie or "both bad"."""
    return {"a": 1.0, "b": 0.0}.get(winner, 0.5)


# --- Bradley-Terry -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Design:
    """The votes aggregated: one row per distinct (model a, model b, outcome), with its count.
    Self-matches are left out: they say nothing about a model's strength."""

    models: list[str]
    a: npt.NDArray[np.intp]
    b: npt.NDArray[np.intp]
    outcome: Floats
    count: Floats


def _design(votes: Sequence[Matchup]) -> _Design:
    models: list[str] = sorted({m for v in votes for m in (v.model_a, v.model_b)})
    index = {model: i for i, model in enumerate(models)}
    counts: dict[tuple[int, int, float], int] = {}
    for v in votes:
        if v.model_a != v.model_b:
            key = (index[v.model_a], index[v.model_b], _score_a(v.winner))
            counts[key] = counts.get(key, 0) + 1
    rows = sorted(counts)
    return _Design(
        models,
        np.array([r[0] for r in rows], dtype=np.intp),
        np.array([r[1] for r in rows], dtype=np.intp),
        np.array([r[2] for r in rows], dtype=np.float64),
        np.array([counts[r] for r in rows], dtype=np.float64),
    )


def _objective(
    ratings: Floats, design: _Design, weights: Floats, alpha: float, l2: float
) -> Floats:
    """Negative log likelihood plus the penalty, per row of `ratings` (rounds x models)."""
    logits = alpha * (ratings[:, design.a] - ratings[:, design.b])
    # -[y log s(z) + (1 - y) log(1 - s(z))] = log(1 + e^z) - y z, computed stably.
    loss = np.logaddexp(0.0, logits) - design.outcome * logits
    return np.asarray((weights * loss).sum(axis=1) + 0.5 * l2 * (ratings**2).sum(axis=1))


def _hessian(curvature: Floats, design: _Design, n: int) -> Floats:
    """Per round, the sum over rows of curvature * (e_a - e_b)(e_a - e_b)^T (rounds x n x n),
    accumulated pair by pair rather than through a dense rows x n x n product."""
    hessian = np.zeros((n, n, curvature.shape[0]))
    rows = curvature.T
    np.add.at(hessian, (design.a, design.a), rows)
    np.add.at(hessian, (design.b, design.b), rows)
    np.add.at(hessian, (design.a, design.b), -rows)
    np.add.at(hessian, (design.b, design.a), -rows)
    return np.moveaxis(hessian, 2, 0)


def _fit(design: _Design, weights: Floats, alpha: float, l2: float) -> Floats:
    """Newton's method with backtracking, for every row of `weights` (rounds x rows) at once:
    the ratings (rounds x models, in units of SCALE points, averaging 0) minimising the
    penalised negative log likelihood. The objective is strictly convex, so the minimum is
    unique and the iteration converges to it from zero."""
    rounds, n = weights.shape[0], len(design.models)
    ratings = np.zeros((rounds, n))
    signs = np.zeros((len(design.a), n))
    signs[np.arange(len(design.a)), design.a] = 1.0
    signs[np.arange(len(design.a)), design.b] = -1.0
    eye = np.eye(n)
    # Converged when the gradient is at rounding level for the number of votes.
    tolerance = _NEWTON_TOLERANCE * np.maximum(1.0, weights.sum(axis=1))
    for _ in range(_NEWTON_MAX_STEPS):
        logits = alpha * (ratings[:, design.a] - ratings[:, design.b])
        p = np.exp(-np.logaddexp(0.0, -logits))  # the logistic function, without overflow
        gradient = alpha * ((weights * (p - design.outcome)) @ signs) + l2 * ratings
        if (np.abs(gradient).max(axis=1, initial=0.0) < tolerance).all():
            break
        hessian = _hessian(alpha**2 * weights * p * (1.0 - p), design, n) + l2 * eye
        step = np.linalg.solve(hessian, gradient[..., None])[..., 0]
        # Halve the step of the rounds where a full one would not decrease the objective.
        current = _objective(ratings, design, weights, alpha, l2)
        slope = (gradient * step).sum(axis=1)
        size = np.ones(rounds)
        # (Within rounding of the current value counts as no worse: near the minimum the
        # objective cannot resolve smaller decreases.)
        slack = 1e-12 * np.maximum(1.0, np.abs(current))
        for _ in range(40):
            candidate = ratings - size[:, None] * step
            expected = current - 1e-4 * size * slope + slack
            worse = _objective(candidate, design, weights, alpha, l2) > expected
            if not worse.any():
                break
            size = np.where(worse, size / 2, size)
        ratings = ratings - size[:, None] * step
    return ratings


def _to_points(ratings: Floats, scale: float, init: float) -> Floats:
    return np.asarray(ratings * scale + init)


def bradley_terry(
    votes: Sequence[Matchup],
    *,
    scale: float = ELO_SCALE,
    base: float = ELO_BASE,
    init: float = ELO_INITIAL,
    l2: float = BT_L2,
) -> dict[str, float]:
    """Maximum-likelihood Bradley-Terry ratings on the Elo scale, averaging `init`."""
    design = _design(votes)
    if not design.models:
        return {}
    fitted = _fit(design, design.count[None, :], math.log(base), l2)[0]
    points = _to_points(fitted, scale, init)
    return {model: float(points[i]) for i, model in enumerate(design.models)}


def bootstrap_intervals(
    votes: Sequence[Matchup],
    *,
    rounds: int = BOOTSTRAP_ROUNDS,
    seed: int = BOOTSTRAP_SEED,
    scale: float = ELO_SCALE,
    base: float = ELO_BASE,
    init: float = ELO_INITIAL,
    l2: float = BT_L2,
) -> dict[str, tuple[float, float]]:
    """95% intervals (the 2.5th and 97.5th percentiles) of each model's rating over `rounds`
    fits on the votes resampled with replacement. Resampling the votes is drawing the counts of
    the distinct outcomes from a multinomial (as FastChat does), from a generator seeded with
    `seed`: the same votes always give the same intervals, on every gateway."""
    design = _design(votes)
    if not design.models:
        return {}
    total = int(design.count.sum())
    if total == 0:  # only self-matches: nothing moves
        return {model: (init, init) for model in design.models}
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(total, design.count / total, size=rounds).astype(np.float64)
    points = _to_points(_fit(design, weights, math.log(base), l2), scale, init)
    lower = np.percentile(points, 2.5, axis=0)
    upper = np.percentile(points, 97.5, axis=0)
    return {model: (float(lower[i]), float(upper[i])) for i, model in enumerate(design.models)}


# --- online Elo --------------------------------------------------------------------------------


@dataclass
class Rating:
    """A model's online Elo and its record."""

    model: str
    rating: float = ELO_INITIAL
    votes: int = 0
    wins: int = 0
    losses: int = 0
    ties: int = 0


def elo_ratings(votes: Iterable[Matchup], *, k: float = ELO_K) -> list[Rating]:
    """Online Elo over the votes in order (as FastChat's compute_elo), best first.

    Ties and "both bad" count half a win each. A model facing itself gets the vote counted but
    its rating, wins and losses do not move: the match says nothing about it.
    """
    table: dict[str, Rating] = {}
    for vote in votes:
        a = table.setdefault(vote.model_a, Rating(vote.model_a))
        b = table.setdefault(vote.model_b, Rating(vote.model_b))
        a.votes += 1
        if a is b:
            continue
        b.votes += 1
        score_a = _score_a(vote.winner)
        expected_a = 1.0 / (1.0 + ELO_BASE ** ((b.rating - a.rating) / ELO_SCALE))
        delta = k * (score_a - expected_a)
        a.rating += delta
        b.rating -= delta
        if score_a == 1.0:
            a.wins, b.losses = a.wins + 1, b.losses + 1
        elif score_a == 0.0:
            a.losses, b.wins = a.losses + 1, b.wins + 1
        else:
            a.ties, b.ties = a.ties + 1, b.ties + 1
    return sorted(table.values(), key=lambda r: (-r.rating, -r.votes, r.model))


# --- the leaderboard ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelStanding:
    """One model's line of the leaderboard."""

    model: str
    rating: float  # Bradley-Terry
    ci_lower: float
    ci_upper: float
    elo: float  # online Elo
    votes: int
    wins: int
    losses: int
    ties: int


def standings(
    votes: Sequence[Matchup], *, rounds: int = BOOTSTRAP_ROUNDS, seed: int = BOOTSTRAP_SEED
) -> list[ModelStanding]:
    """Every model that has a vote, best Bradley-Terry rating first (then most votes, then
    name), with its interval, online Elo and record."""
    ratings = bradley_terry(votes)
    intervals = bootstrap_intervals(votes, rounds=rounds, seed=seed)
    table = [
        ModelStanding(
            model=r.model,
            rating=ratings[r.model],
            ci_lower=intervals[r.model][0],
            ci_upper=intervals[r.model][1],
            elo=r.rating,
            votes=r.votes,
            wins=r.wins,
            losses=r.losses,
            ties=r.ties,
        )
        for r in elo_ratings(votes)
    ]
    return sorted(table, key=lambda s: (-round(s.rating, 9), -s.votes, s.model))
