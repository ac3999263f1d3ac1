"""The arena's core: anonymous battles between two chat models, their votes kept in SQLite, and
Elo ratings computed from the votes. Nothing here knows about HTTP."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import sqlite3
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

logger = logging.getLogger(__name__)

Side = Literal["a", "b"]
# What a vote says: model a better, model b better, a tie, or both bad (a tie for the ratings,
# as FastChat's "tie (bothbad)").
Winner = Literal["a", "b", "tie", "both_bad"]
WINNERS: tuple[str, ...] = get_args(Winner)

# Classic Elo constants; K is larger than FastChat's 4 because an arena here sees few votes.
ELO_K = 32.0
ELO_SCALE = 400.0
ELO_BASE = 10.0
ELO_INITIAL = 1000.0

ARENA_DB_FILENAME = "arena.sqlite3"


def default_arena_db(environ: Mapping[str, str]) -> str:
    """Where votes go by default: the user's data dir ($XDG_DATA_HOME or ~/.local/share), under
    chatfleet/, or the working directory when there is no home."""
    data_home = environ.get("XDG_DATA_HOME") or (
        os.path.join(environ["HOME"], ".local", "share") if environ.get("HOME") else ""
    )
    if not data_home:
        return "chatfleet-arena.sqlite3"
    return os.path.join(data_home, "chatfleet", ARENA_DB_FILENAME)


# --- battles ---------------------------------------------------------------------------------


@dataclass
class Battle:
    """Two models facing each other; their names stay on the server until the vote."""

    id: str
    model_a: str
    model_b: str
    created: float
    # Sides whose answer was asked for: a vote needs both.
    asked: set[str] = field(default_factory=set)
    winner: str | None = None

    @property
    def self_match(self) -> bool:
        return self.model_a == self.model_b

    def model(self, side: str) -> str:
        return self.model_a if side == "a" else self.model_b


def pick_pair(models: Sequence[str], rng: random.Random) -> tuple[str, str]:
    """Two different models at random, in random order; a lone model faces itself."""
    if not models:
        raise ValueError("no models to pick from")
    unique = sorted(set(models))
    if len(unique) == 1:
        return unique[0], unique[0]
    first, second = rng.sample(unique, 2)
    return first, second


class BattleBook:
    """Battles waiting for their vote, in memory. The oldest are forgotten beyond `capacity`, so
    abandoned battles cannot grow it without bound."""

    def __init__(self, rng: random.Random | None = None, capacity: int = 10_000) -> None:
        self._rng = rng or random.Random()
        self._capacity = capacity
        self._battles: OrderedDict[str, Battle] = OrderedDict()

    def start(self, models: Sequence[str]) -> Battle:
        model_a, model_b = pick_pair(models, self._rng)
        battle = Battle(uuid.uuid4().hex, model_a, model_b, time.time())
        self._battles[battle.id] = battle
        while len(self._battles) > self._capacity:
            self._battles.popitem(last=False)
        return battle

    def get(self, battle_id: str) -> Battle | None:
        return self._battles.get(battle_id)

    def __len__(self) -> int:
        return len(self._battles)


# --- votes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Vote:
    battle_id: str
    model_a: str
    model_b: str
    winner: str
    created: float


_SCHEMA = """
CREATE TABLE IF NOT EXISTS votes (
    battle_id TEXT PRIMARY KEY,
    model_a   TEXT NOT NULL,
    model_b   TEXT NOT NULL,
    winner    TEXT NOT NULL CHECK (winner IN ('a', 'b', 'tie', 'both_bad')),
    created   REAL NOT NULL
)
"""


class DuplicateVoteError(Exception):
    """The battle already has a vote in the store."""


class ArenaStore:
    """Votes in a SQLite file. Each call opens its own connection in a worker thread, so the event
    loop never waits on the disk and no connection is shared between threads. The file (and its
    folder) is created on first use: a gateway whose arena is never used writes nothing."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=10.0)
        connection.execute(_SCHEMA)
        return connection

    def _add(self, vote: Vote) -> None:
        connection = self._connect()
        try:
            with connection:
                connection.execute(
                    "INSERT INTO votes (battle_id, model_a, model_b, winner, created) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (vote.battle_id, vote.model_a, vote.model_b, vote.winner, vote.created),
                )
        except sqlite3.IntegrityError as error:
            raise DuplicateVoteError(vote.battle_id) from error
        finally:
            connection.close()

    def _all(self) -> list[Vote]:
        if not self.path.exists():
            return []  # reading creates nothing: the file appears with the first vote
        connection = self._connect()
        try:
            rows = connection.execute(
                "SELECT battle_id, model_a, model_b, winner, created FROM votes ORDER BY rowid"
            ).fetchall()
        finally:
            connection.close()
        return [Vote(*row) for row in rows]

    async def add(self, vote: Vote) -> None:
        """Record a vote; DuplicateVoteError if its battle already has one."""
        if vote.winner not in WINNERS:
            raise ValueError(f"winner must be one of {', '.join(WINNERS)}, got {vote.winner!r}")
        await asyncio.to_thread(self._add, vote)

    async def votes(self) -> list[Vote]:
        """Every vote, oldest first."""
        return await asyncio.to_thread(self._all)


# --- ratings ---------------------------------------------------------------------------------


@dataclass
class Rating:
    model: str
    rating: float = ELO_INITIAL
    votes: int = 0
    wins: int = 0
    losses: int = 0
    ties: int = 0


def elo_ratings(votes: Iterable[Vote], *, k: float = ELO_K) -> list[Rating]:
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
        score_a = {"a": 1.0, "b": 0.0}.get(vote.winner, 0.5)
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
