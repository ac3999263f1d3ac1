"""Ratings from votes: Bradley-Terry against an independent reference, bootstrap intervals, and
the online Elo the leaderboard showed before."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import pytest

from services.leaderboard.ratings import (
    BT_L2,
    ELO_INITIAL,
    bootstrap_intervals,
    bradley_terry,
    elo_ratings,
    standings,
)
from services.leaderboard.store import Vote

# Hidden strengths (Elo points) the synthetic votes are drawn from.
STRENGTH = {"alpha": 120.0, "bravo": 40.0, "charlie": 0.0, "delta": -60.0, "echo": -150.0}


@dataclass(frozen=True)
class Match:
    model_a: str
    model_b: str
    winner: str


def synthetic_votes(count: int, seed: int = 15) -> list[Match]:
    """A fixed vote set: pairs at random, outcomes by the Bradley-Terry law of STRENGTH, about
    one vote in six a tie or "both bad", a few self-matches."""
    rng = random.Random(seed)
    models = sorted(STRENGTH)
    votes = []
    for i in range(count):
        if i % 50 == 0:
            votes.append(Match("charlie", "charlie", "a"))
            continue
        a, b = rng.sample(models, 2)
        p_a = 1 / (1 + 10 ** ((STRENGTH[b] - STRENGTH[a]) / 400))
        roll = rng.random()
        if roll < 0.17:
            winner = "tie" if roll < 0.12 else "both_bad"
        else:
            winner = "a" if rng.random() < p_a else "b"
        votes.append(Match(a, b, winner))
    return votes


def sklearn_reference(votes: list[Match]) -> dict[str, float]:
    """FastChat's own method, independently of ours: scikit-learn's LogisticRegression (L-BFGS)
    on one row per vote, +ln(10) for model a and -ln(10) for model b, no intercept; a tie is
    two half-weight rows, a win and a loss. The same weak L2 penalty (C = 1 / BT_L2) and a
    tolerance tight enough for 1e-6 points."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    models = sorted({m for v in votes for m in (v.model_a, v.model_b)})
    index = {m: i for i, m in enumerate(models)}
    rows, labels, weights = [], [], []
    for v in votes:
        if v.model_a == v.model_b:
            continue
        row = np.zeros(len(models))
        row[index[v.model_a]], row[index[v.model_b]] = math.log(10), -math.log(10)
        outcomes = {"a": [(1, 1.0)], "b": [(0, 1.0)]}.get(v.winner, [(1, 0.5), (0, 0.5)])
        for label, weight in outcomes:
            rows.append(row)
            labels.append(label)
            weights.append(weight)
    fit = linear_model.LogisticRegression(
        fit_intercept=False, C=1 / BT_L2, tol=1e-15, max_iter=100_000
    )
    fit.fit(np.array(rows), np.array(labels), sample_weight=np.array(weights))
    return {m: 400 * fit.coef_[0][i] + 1000 for m, i in index.items()}


# --- Bradley-Terry -----------------------------------------------------------------------------


def test_bradley_terry_matches_logistic_regression_within_1e_6() -> None:
    votes = synthetic_votes(400)
    ours = bradley_terry(votes)
    reference = sklearn_reference(votes)
    assert ours.keys() == reference.keys() == STRENGTH.keys()
    for model in ours:
        assert ours[model] == pytest.approx(reference[model], abs=1e-6), model
    # And it finds the hidden order, around the anchor.
    assert sorted(ours, key=ours.__getitem__, reverse=True) == sorted(
        STRENGTH, key=STRENGTH.__getitem__, reverse=True
    )
    assert sum(ours.values()) / len(ours) == pytest.approx(ELO_INITIAL, abs=1e-6)


def test_bradley_terry_is_deterministic_and_order_free() -> None:
    votes = synthetic_votes(200)
    shuffled = list(votes)
    random.Random(1).shuffle(shuffled)
    assert bradley_terry(votes) == bradley_terry(votes)
    again = bradley_terry(shuffled)
    for model, rating in bradley_terry(votes).items():
        assert again[model] == pytest.approx(rating, abs=1e-9)


def test_ties_are_half_a_win() -> None:
    # One win each way and two ties: even. A tie-only record is even too.
    even = bradley_terry(
        [Match("x", "y", "a"), Match("x", "y", "b"), Match("x", "y", "tie"), Match("y", "x", "tie")]
    )
    assert even["x"] == pytest.approx(even["y"], abs=1e-9) == pytest.approx(ELO_INITIAL)
    # Two wins and a tie are 2.5 of 3: P(x beats y) = 5/6 at the likelihood's maximum (the
    # weak penalty pulls it in only slightly).
    ratings = bradley_terry([Match("x", "y", "a"), Match("y", "x", "b"), Match("x", "y", "tie")])
    p = 1 / (1 + 10 ** ((ratings["y"] - ratings["x"]) / 400))
    assert p == pytest.approx(5 / 6, abs=2e-3)


def test_a_model_that_only_won_gets_a_finite_rating() -> None:
    ratings = bradley_terry([Match("x", "y", "a"), Match("y", "z", "a")])
    assert all(math.isfinite(r) for r in ratings.values())
    assert ratings["x"] > ratings["y"] > ratings["z"]


def test_self_matches_move_nothing() -> None:
    assert bradley_terry([Match("solo", "solo", "a")]) == {"solo": ELO_INITIAL}
    assert bradley_terry([]) == {}


# --- bootstrap ---------------------------------------------------------------------------------


def test_bootstrap_intervals_are_seeded_and_shrink_with_more_votes() -> None:
    few, many = synthetic_votes(120), synthetic_votes(1200)
    intervals = bootstrap_intervals(few, rounds=200, seed=3)
    assert intervals == bootstrap_intervals(few, rounds=200, seed=3)
    assert intervals != bootstrap_intervals(few, rounds=200, seed=4)
    point = bradley_terry(few)
    for model, (low, high) in intervals.items():
        assert low < point[model] < high
    tight = bootstrap_intervals(many, rounds=200, seed=3)
    for model in STRENGTH:
        assert tight[model][1] - tight[model][0] < intervals[model][1] - intervals[model][0]


def test_standings_rank_by_bradley_terry_with_records() -> None:
    votes = [
        Vote(str(i), v.model_a, v.model_b, v.winner, i) for i, v in enumerate(synthetic_votes(300))
    ]
    table = standings(votes, rounds=50)
    assert [s.model for s in table] == sorted(STRENGTH, key=STRENGTH.__getitem__, reverse=True)
    charlie = next(s for s in table if s.model == "charlie")
    played = [v for v in votes if "charlie" in (v.model_a, v.model_b)]
    assert charlie.votes == len(played)
    assert charlie.wins + charlie.losses + charlie.ties == len(
        [v for v in played if v.model_a != v.model_b]
    )
    for s in table:
        assert s.ci_lower <= s.rating <= s.ci_upper


# --- online Elo --------------------------------------------------------------------------------


def vote(a: str, b: str, winner: str, n: int = 0) -> Vote:
    return Vote(f"battle-{a}-{b}-{n}", a, b, winner, 1000.0 + n)


def test_one_win_moves_both_ratings_by_half_k() -> None:
    board = elo_ratings([vote("x", "y", "a")], k=32)
    assert [(r.model, r.rating, r.votes, r.wins, r.losses) for r in board] == [
        ("x", ELO_INITIAL + 16, 1, 1, 0),
        ("y", ELO_INITIAL - 16, 1, 0, 1),
    ]


def test_elo_is_deterministic_and_order_dependent() -> None:
    votes = [vote("x", "y", "a", 1), vote("x", "y", "b", 2)]
    board = {r.model: r for r in elo_ratings(votes, k=32)}
    # Win for x at equal ratings (+16), then loss for x when expected to win: x ends below y.
    expected = 16 + 32 * (0 - 1 / (1 + 10 ** (-32 / 400)))
    assert board["x"].rating == pytest.approx(ELO_INITIAL + expected)
    assert board["y"].rating == pytest.approx(ELO_INITIAL - expected)
    assert board["x"].rating < board["y"].rating
    assert elo_ratings(votes, k=32) == elo_ratings(votes, k=32)


def test_ties_and_both_bad_count_as_ties() -> None:
    board = {r.model: r for r in elo_ratings([vote("x", "y", "tie"), vote("y", "x", "both_bad")])}
    assert board["x"].rating == pytest.approx(ELO_INITIAL)
    assert (board["x"].ties, board["y"].ties) == (2, 2)
    assert (board["x"].votes, board["x"].wins, board["x"].losses) == (2, 0, 0)


def test_self_match_counts_the_vote_but_moves_nothing() -> None:
    [solo] = elo_ratings([vote("solo", "solo", "a"), vote("solo", "solo", "tie", 2)])
    assert (solo.model, solo.rating, solo.votes, solo.wins, solo.losses, solo.ties) == (
        "solo",
        ELO_INITIAL,
        2,
        0,
        0,
        0,
    )


def test_elo_table_is_sorted_best_first_then_by_name() -> None:
    votes = [vote("b", "c", "a"), vote("a", "d", "tie")]
    assert [r.model for r in elo_ratings(votes)] == ["b", "a", "d", "c"]
