"""The arena's core: picking pairs, battles kept in the store (not in a gateway's memory), and the
gateway's store flags."""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pytest

from services.gateway.arena import Arena, default_arena_db, pick_pair
from services.gateway.config import GatewayConfig, add_arguments
from services.leaderboard.store import (
    BattleDecidedError,
    BattleNotFoundError,
    BattleNotReadyError,
    SQLiteStore,
)

# --- pairs -----------------------------------------------------------------------------------


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


# --- battles in the store --------------------------------------------------------------------


async def test_a_battle_started_by_one_arena_is_voted_through_another(tmp_path: Path) -> None:
    """Two arenas on one store stand for two gateways (or one gateway before and after a
    restart): neither keeps the battle in memory."""
    path = tmp_path / "arena.sqlite3"
    first, second = Arena(SQLiteStore(path), random.Random(1)), Arena(SQLiteStore(path))
    battle = await first.start(["x", "y"])
    assert {battle.model_a, battle.model_b} == {"x", "y"}
    assert not battle.self_match
    assert (await second.ask(battle.id, "a")).asked == {"a"}
    with pytest.raises(BattleNotReadyError):
        await second.vote(battle.id, "a")
    assert (await first.ask(battle.id, "b")).asked == {"a", "b"}
    vote = await second.vote(battle.id, "tie")
    assert (vote.model_a, vote.model_b, vote.winner) == (battle.model_a, battle.model_b, "tie")
    with pytest.raises(BattleDecidedError):
        await first.vote(battle.id, "a")
    with pytest.raises(BattleDecidedError):
        await first.ask(battle.id, "a")
    assert await first.store.votes() == [vote]


async def test_a_lone_model_battle_is_a_self_match(tmp_path: Path) -> None:
    battle = await Arena(SQLiteStore(tmp_path / "a.sqlite3")).start(["only"])
    assert battle.self_match
    assert battle.model("a") == battle.model("b") == "only"


async def test_unknown_battles_are_not_found(tmp_path: Path) -> None:
    arena = Arena(SQLiteStore(tmp_path / "a.sqlite3"))
    with pytest.raises(BattleNotFoundError):
        await arena.ask("nope", "a")
    with pytest.raises(BattleNotFoundError):
        await arena.vote("nope", "a")


def test_default_path_is_in_the_user_data_dir() -> None:
    assert default_arena_db({"XDG_DATA_HOME": "/data"}) == "/data/chatfleet/arena.sqlite3"
    assert default_arena_db({"HOME": "/home/u"}) == "/home/u/.local/share/chatfleet/arena.sqlite3"
    assert default_arena_db({}) == "chatfleet-arena.sqlite3"


# --- the gateway flags -----------------------------------------------------------------------


def _config(argv: list[str], environ: dict[str, str]) -> GatewayConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser, environ)
    return GatewayConfig.from_namespace(parser.parse_args(argv))


def test_arena_db_flag_env_and_default() -> None:
    assert _config([], {"HOME": "/home/u"}).arena_db == default_arena_db({"HOME": "/home/u"})
    assert _config([], {"CHATFLEET_ARENA_DB": "/env.sqlite3"}).arena_db == "/env.sqlite3"
    flag = _config(["--arena-db", "/flag.sqlite3"], {"CHATFLEET_ARENA_DB": "/env.sqlite3"})
    assert flag.arena_db == "/flag.sqlite3"
    assert flag.leaderboard_store_url == "/flag.sqlite3"
    with pytest.raises(ValueError, match="--arena-db"):
        _config(["--arena-db", ""], {})


def test_leaderboard_url_flag_env_and_fallback() -> None:
    pg = "postgresql://chatfleet:secret@db:5432/chatfleet"
    from_env = _config(["--arena-db", "/a.sqlite3"], {"CHATFLEET_LEADERBOARD_URL": pg})
    assert from_env.leaderboard_store_url == pg
    flag = _config(["--leaderboard-url", "sqlite:///srv/lb.sqlite3"], {})
    assert flag.leaderboard_store_url == "sqlite:///srv/lb.sqlite3"
    # Empty (an optional Kubernetes Secret that is missing) falls back to --arena-db.
    empty = _config(["--arena-db", "/a.sqlite3"], {"CHATFLEET_LEADERBOARD_URL": ""})
    assert empty.leaderboard_store_url == "/a.sqlite3"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://db/x", "unknown leaderboard URL scheme 'mysql'"),
        ("sqlite://", "names no SQLite file"),
        ("postgresql://u:hunter2@db:notaport/x", "bad PostgreSQL URL"),
    ],
)
def test_a_bad_leaderboard_url_fails_at_start_up_clearly(url: str, message: str) -> None:
    with pytest.raises(ValueError, match="--leaderboard-url") as caught:
        _config(["--leaderboard-url", url], {})
    assert message in str(caught.value)
    assert "hunter2" not in str(caught.value)
