"""The arena's core: picking pairs, the vote store in SQLite, and Elo ratings."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pytest

from services.gateway.arena import (
    ELO_INITIAL,
    ArenaStore,
    BattleBook,
    DuplicateVoteError,
    Vote,
    default_arena_db,
    elo_ratings,
    pick_pair,
)
from services.gateway.config import GatewayConfig, add_arguments


def vote(a: str, b: str, winner: str, n: int = 0) -> Vote:
    return Vote(f"battle-{a}-{b}-{n}", a, b, winner, 1000.0 + n)


# --- pairs and battles -----------------------------------------------------------------------


def test_pick_pair_is_two_different_models_in_both_orders() -> None:
    rng = random.Random(7)
    pairs = {pick_pair(["x", "y", "z"], rng) for _ in range(200)}
    assert all(a != b for a, b in pairs)
    assert pairs == {(a, b) for a in "xyz" for b in "xyz" if a != b}


def test_a_lone_model_faces_itself() -> None:
    assert pick_pair(["solo", "solo"], random.Random(0)) == ("solo", "solo")


def test_pick_pair_needs_a_model() -> None:
    with pytest.raises(ValueError, match="no models"):
        pick_pair([], random.Random(0))


def test_battle_book_remembers_battles_up_to_its_capacity() -> None:
    book = BattleBook(random.Random(1), capacity=2)
    first, second, third = (book.start(["x", "y"]) for _ in range(3))
    assert len(book) == 2
    assert book.get(first.id) is None
    assert book.get(second.id) is second
    assert book.get(third.id) is third
    assert {third.model_a, third.model_b} == {"x", "y"}
    assert not third.self_match
    assert book.start(["only"]).self_match


# --- the store -------------------------------------------------------------------------------


async def test_store_keeps_votes_in_order_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "arena.sqlite3"
    store = ArenaStore(path)
    assert not path.exists()  # nothing is written before the first use
    votes = [vote("x", "y", "a", 1), vote("y", "z", "tie", 2), vote("x", "z", "both_bad", 3)]
    for v in votes:
        await store.add(v)
    assert await ArenaStore(path).votes() == votes


async def test_store_refuses_a_second_vote_on_a_battle(tmp_path: Path) -> None:
    store = ArenaStore(tmp_path / "arena.sqlite3")
    await store.add(vote("x", "y", "a"))
    with pytest.raises(DuplicateVoteError):
        await store.add(vote("x", "y", "b"))
    assert [v.winner for v in await store.votes()] == ["a"]


async def test_store_refuses_an_unknown_winner(tmp_path: Path) -> None:
    store = ArenaStore(tmp_path / "arena.sqlite3")
    with pytest.raises(ValueError, match="winner must be one of"):
        await store.add(vote("x", "y", "left"))


async def test_empty_store_has_no_votes_and_reading_creates_no_file(tmp_path: Path) -> None:
    path = tmp_path / "arena.sqlite3"
    assert await ArenaStore(path).votes() == []
    assert not path.exists()


def test_default_path_is_in_the_user_data_dir() -> None:
    assert default_arena_db({"XDG_DATA_HOME": "/data"}) == "/data/chatfleet/arena.sqlite3"
    assert default_arena_db({"HOME": "/home/u"}) == "/home/u/.local/share/chatfleet/arena.sqlite3"
    assert default_arena_db({}) == "chatfleet-arena.sqlite3"


# --- Elo -------------------------------------------------------------------------------------


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


def test_leaderboard_is_sorted_best_first_then_by_name() -> None:
    votes = [vote("b", "c", "a"), vote("a", "d", "tie")]
    assert [r.model for r in elo_ratings(votes)] == ["b", "a", "d", "c"]


# --- the gateway flag ------------------------------------------------------------------------


def _config(argv: list[str], environ: dict[str, str]) -> GatewayConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser, environ)
    return GatewayConfig.from_namespace(parser.parse_args(argv))


def test_arena_db_flag_env_and_default() -> None:
    assert _config([], {"HOME": "/home/u"}).arena_db == default_arena_db({"HOME": "/home/u"})
    assert _config([], {"CHATFLEET_ARENA_DB": "/env.sqlite3"}).arena_db == "/env.sqlite3"
    flag = _config(["--arena-db", "/flag.sqlite3"], {"CHATFLEET_ARENA_DB": "/env.sqlite3"})
    assert flag.arena_db == "/flag.sqlite3"
    with pytest.raises(ValueError, match="--arena-db"):
        _config(["--arena-db", ""], {})
