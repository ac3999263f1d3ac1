"""The leaderboard store on SQLite: battles, one vote per battle however votes race, old files,
MT-bench scores, and the URL that chooses the store. (PostgreSQL: tests/integration.)"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from services.cli.launcher import free_port
from services.leaderboard.store import (
    BATTLE_TTL_SECONDS,
    Battle,
    BattleDecidedError,
    BattleNotFoundError,
    BattleNotReadyError,
    MTBenchScore,
    SQLiteStore,
    StoreLocation,
    StoreUnavailableError,
    Vote,
    open_store,
    parse_store_url,
    redact,
)


async def decided(store: SQLiteStore, battle_id: str, a: str, b: str, winner: str) -> Vote:
    await store.create_battle(Battle(battle_id, a, b, 1000.0))
    for side in "ab":
        await store.mark_asked(battle_id, side)
    return await store.record_vote(battle_id, winner, at=2000.0)


# --- battles and votes -----------------------------------------------------------------------


async def test_reading_an_unused_store_creates_no_file(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "arena.sqlite3"
    store = SQLiteStore(path)
    assert await store.votes() == []
    assert await store.mtbench_scores() == []
    assert await store.get_battle("x") is None
    with pytest.raises(BattleNotFoundError):
        await store.mark_asked("x", "a")
    assert not path.exists()


async def test_votes_are_kept_in_order_across_instances(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "arena.sqlite3"
    store = SQLiteStore(path)
    votes = [
        await decided(store, "1", "x", "y", "a"),
        await decided(store, "2", "y", "z", "tie"),
        await decided(store, "3", "x", "z", "both_bad"),
    ]
    assert votes[0] == Vote("1", "x", "y", "a", 2000.0)
    assert await SQLiteStore(path).votes() == votes
    battle = await SQLiteStore(path).get_battle("2")
    assert battle == Battle("2", "y", "z", 1000.0, frozenset("ab"), "tie")


async def test_a_battle_takes_one_vote_after_both_answers(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "arena.sqlite3")
    await store.create_battle(Battle("b1", "x", "y", 1000.0))
    with pytest.raises(BattleNotReadyError):
        await store.record_vote("b1", "a")
    assert (await store.mark_asked("b1", "b")).asked == {"b"}
    with pytest.raises(BattleNotReadyError):
        await store.record_vote("b1", "a")
    await store.mark_asked("b1", "a")
    await store.record_vote("b1", "b")
    with pytest.raises(BattleDecidedError):
        await store.record_vote("b1", "a")
    with pytest.raises(BattleDecidedError):
        await store.mark_asked("b1", "a")
    with pytest.raises(BattleNotFoundError):
        await store.record_vote("nope", "a")
    assert [v.winner for v in await store.votes()] == ["b"]


async def test_racing_votes_on_one_battle_count_once(tmp_path: Path) -> None:
    path = tmp_path / "arena.sqlite3"
    await decided(SQLiteStore(path), "warm", "x", "y", "a")  # the schema exists
    store = SQLiteStore(path)
    await store.create_battle(Battle("race", "x", "y", 1000.0, frozenset("ab")))
    # Separate store objects, as separate gateways on one file; each call its own thread.
    results = await asyncio.gather(
        *(SQLiteStore(path).record_vote("race", w) for w in ("a", "b", "tie", "a", "b", "tie")),
        return_exceptions=True,
    )
    winners = [r.winner for r in results if isinstance(r, Vote)]
    assert len(winners) == 1
    assert all(isinstance(r, BattleDecidedError) for r in results if not isinstance(r, Vote))
    assert [v.winner for v in await store.votes() if v.battle_id == "race"] == winners


async def test_bad_winner_or_side_is_refused(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "arena.sqlite3")
    with pytest.raises(ValueError, match="winner must be one of"):
        await store.record_vote("b1", "left")
    with pytest.raises(ValueError, match="side must be one of"):
        await store.mark_asked("b1", "c")


async def test_unvoted_battles_expire_and_voted_ones_stay(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "arena.sqlite3")
    await decided(store, "voted", "x", "y", "a")
    await store.create_battle(Battle("abandoned", "x", "y", 1000.0))
    await store.create_battle(Battle("new", "x", "y", 1000.0 + BATTLE_TTL_SECONDS + 1))
    assert await store.get_battle("abandoned") is None
    assert await store.get_battle("voted") is not None
    assert await store.get_battle("new") is not None


async def test_a_file_from_an_earlier_release_keeps_its_votes(tmp_path: Path) -> None:
    path = tmp_path / "arena.sqlite3"
    connection = sqlite3.connect(path)
    connection.execute(
        "CREATE TABLE votes (battle_id TEXT PRIMARY KEY, model_a TEXT NOT NULL, "
        "model_b TEXT NOT NULL, winner TEXT NOT NULL CHECK (winner IN ('a', 'b', 'tie', "
        "'both_bad')), created REAL NOT NULL)"
    )
    connection.execute("INSERT INTO votes VALUES ('old', 'x', 'y', 'b', 5.0)")
    connection.commit()
    connection.close()
    store = SQLiteStore(path)
    new = await decided(store, "new", "y", "z", "a")
    assert await store.votes() == [Vote("old", "x", "y", "b", 5.0), new]


async def test_a_broken_file_is_store_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "arena.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreUnavailableError, match=str(path)):
        await SQLiteStore(path).votes()


# --- MT-bench scores -------------------------------------------------------------------------


async def test_mtbench_keeps_the_latest_score_per_model_and_judge(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "arena.sqlite3")
    await store.record_mtbench(
        [MTBenchScore("m1", "judge-a", 5.0, 80, 0), MTBenchScore("m2", "judge-a", 6.5, 79, 1)]
    )
    await store.record_mtbench([MTBenchScore("m1", "judge-a", 7.25, 80, 0)])
    await store.record_mtbench([MTBenchScore("m1", "judge-b", 4.0, 10, 2)])
    await store.record_mtbench([])
    assert await SQLiteStore(tmp_path / "arena.sqlite3").mtbench_scores() == [
        MTBenchScore("m2", "judge-a", 6.5, 79, 1),
        MTBenchScore("m1", "judge-a", 7.25, 80, 0),
        MTBenchScore("m1", "judge-b", 4.0, 10, 2),
    ]


@pytest.mark.parametrize(
    "fields",
    [("", "j", 5.0, 1, 0), ("m", "", 5.0, 1, 0), ("m", "j", 11.0, 1, 0), ("m", "j", 5.0, -1, 0)],
)
def test_a_nonsense_mtbench_score_is_refused(fields: tuple[str, str, float, int, int]) -> None:
    with pytest.raises(ValueError):
        MTBenchScore(*fields)


# --- the URL ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "location"),
    [
        ("sqlite:///abs/votes.db", StoreLocation("sqlite", "/abs/votes.db")),
        ("sqlite://relative/votes.db", StoreLocation("sqlite", "relative/votes.db")),
        ("/plain/path.sqlite3", StoreLocation("sqlite", "/plain/path.sqlite3")),
        ("votes.sqlite3", StoreLocation("sqlite", "votes.sqlite3")),
        ("postgresql://u:p@db:5432/x", StoreLocation("postgresql", "postgresql://u:p@db:5432/x")),
        ("postgres://db/x", StoreLocation("postgresql", "postgresql://db/x")),
    ],
)
def test_store_urls(url: str, location: StoreLocation) -> None:
    assert parse_store_url(url) == location


def test_passwords_are_masked_in_what_is_shown() -> None:
    assert redact("postgresql://u:secret@db:5432/x") == "postgresql://u:***@db:5432/x"
    assert redact("postgresql://db/x") == "postgresql://db/x"
    assert parse_store_url("postgresql://u:secret@db/x").display == "postgresql://u:***@db/x"


async def test_open_store_gives_sqlite_for_paths_and_sqlite_urls(tmp_path: Path) -> None:
    for url in (str(tmp_path / "a.sqlite3"), f"sqlite://{tmp_path}/b.sqlite3"):
        store = await open_store(url)
        assert isinstance(store, SQLiteStore)
        await decided(store, "1", "x", "y", "a")
        await store.close()
    assert (tmp_path / "a.sqlite3").exists() and (tmp_path / "b.sqlite3").exists()


async def test_an_unreachable_postgresql_fails_clearly_without_the_password() -> None:
    url = f"postgresql://chatfleet:hunter2@127.0.0.1:{free_port()}/chatfleet"
    with pytest.raises(StoreUnavailableError) as caught:
        await open_store(url, connect_timeout=5)
    message = str(caught.value)
    assert "cannot connect to the PostgreSQL database postgresql://chatfleet:***@" in message
    assert "hunter2" not in message
