"""Where arena battles, votes and MT-bench scores live: one async interface, two implementations
chosen by a URL. SQLite (one file) is the embedded default for one gateway; PostgreSQL is shared by
every gateway replica, so a battle started on one gateway can be voted on through another."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import math
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TypeVar, get_args
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from services.common.errors import UnavailableError

logger = logging.getLogger(__name__)

T = TypeVar("T")

Side = Literal["a", "b"]
SIDES: tuple[str, ...] = get_args(Side)
# What a vote says: model a better, model b better, a tie, or both bad (a tie for the ratings,
# as FastChat's "tie (bothbad)").
Winner = Literal["a", "b", "tie", "both_bad"]
WINNERS: tuple[str, ...] = get_args(Winner)

# A battle nobody voted on is forgotten after this long, so abandoned battles cannot grow the
# store without bound (voted ones stay: they are the history behind the votes).
BATTLE_TTL_SECONDS = 24 * 3600.0
SQLITE_SCHEMES = ("sqlite",)
POSTGRES_SCHEMES = ("postgresql", "postgres")
_URL_HELP = "sqlite:///ABSOLUTE/PATH, a file path, or postgresql://USER:PASSWORD@HOST:PORT/DATABASE"


# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class MTBenchScore:
    """One model's MT-bench result under one judge (single-answer grading)."""

    model: str
    judge: str
    score: float  # mean 1-10 single-answer rating
    questions: int  # answers judged with a rating
    unparsed: int  # judgments without [[rating]]

    def __post_init__(self) -> None:
        if not self.model or not self.judge:
            raise ValueError("an MT-bench score needs a model and a judge")
        if not (math.isfinite(self.score) and 0 <= self.score <= 10):
            raise ValueError(f"an MT-bench score is between 0 and 10, got {self.score}")
        if self.questions < 0 or self.unparsed < 0:
            raise ValueError("MT-bench question counts cannot be negative")


@dataclass(frozen=True)
class Battle:
    """Two models facing each other; their names stay on the server until the vote."""

    id: str
    model_a: str
    model_b: str
    created: float
    # Sides whose answer was asked for: a vote needs both.
    asked: frozenset[str] = field(default_factory=frozenset)
    winner: str | None = None

    @property
    def self_match(self) -> bool:
        return self.model_a == self.model_b

    def model(self, side: str) -> str:
        return self.model_a if side == "a" else self.model_b


@dataclass(frozen=True)
class Vote:
    battle_id: str
    model_a: str
    model_b: str
    winner: str
    created: float


# --- errors ----------------------------------------------------------------------------------


class InvalidStoreURLError(ValueError):
    """The leaderboard URL names no store this build can open."""


class StoreUnavailableError(UnavailableError):
    """The store cannot be reached or failed (HTTP 503). `str()` says what failed, for logs
    (passwords masked); API clients get only `message`, which names no host or file."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.message = "The leaderboard store is unavailable; try again later."


def _failed(description: str, error: BaseException) -> StoreUnavailableError:
    """A failure of a working store: logged here with its cause, since the client is not told."""
    logger.error("%s failed: %s", description, error)
    return StoreUnavailableError(f"{description} failed: {error}")


class BattleNotFoundError(Exception):
    """No such battle: it never existed or expired unvoted."""


class BattleDecidedError(Exception):
    """The battle already has its vote."""


class BattleNotReadyError(Exception):
    """A vote before both sides were asked to answer."""


# --- the URL ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreLocation:
    """A parsed leaderboard URL: a SQLite file or a PostgreSQL DSN."""

    kind: Literal["sqlite", "postgresql"]
    target: str

    @property
    def display(self) -> str:
        """The location for logs and messages: a PostgreSQL password is masked."""
        return self.target if self.kind == "sqlite" else redact(self.target)


def redact(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def parse_store_url(url: str) -> StoreLocation:
    """`sqlite:///abs/path` (or `sqlite://relative/path`), a plain file path, or
    `postgresql://...` / `postgres://...`; InvalidStoreURLError says what is wrong."""
    text = url.strip()
    if not text:
        raise InvalidStoreURLError(f"the leaderboard URL is empty: use {_URL_HELP}")
    scheme, sep, rest = text.partition("://")
    if not sep:
        if text == ":memory:":
            raise InvalidStoreURLError(
                "an in-memory SQLite store would lose every vote: use a file"
            )
        return StoreLocation("sqlite", text)
    scheme = scheme.lower()
    if scheme in SQLITE_SCHEMES:
        if rest in ("", "/", ":memory:", "/:memory:"):
            raise InvalidStoreURLError(f"{url!r} names no SQLite file: use {_URL_HELP}")
        return StoreLocation("sqlite", rest)
    if scheme in POSTGRES_SCHEMES:
        dsn = f"postgresql://{rest}"
        try:
            urlsplit(dsn).port  # noqa: B018 - raises on a port that is not a number
        except ValueError as error:
            raise InvalidStoreURLError(f"bad PostgreSQL URL {redact(dsn)!r}: {error}") from None
        return StoreLocation("postgresql", dsn)
    raise InvalidStoreURLError(f"unknown leaderboard URL scheme {scheme!r}: use {_URL_HELP}")


async def open_store(url: str, *, connect_timeout: float = 10.0) -> LeaderboardStore:
    """The store `url` names ("sqlite:///abs/path", a plain file path, or "postgresql://...").
    PostgreSQL is connected to and its tables created at once, so a wrong address or password
    fails here with StoreUnavailableError; a SQLite file is created on the first write."""
    location = parse_store_url(url)
    if location.kind == "sqlite":
        return SQLiteStore(location.target)
    return await PostgresStore.connect(location.target, timeout=connect_timeout)


# --- the interface ---------------------------------------------------------------------------


class LeaderboardStore(abc.ABC):
    """Battles, votes and MT-bench scores. Every method is safe to call from several gateways at
    once: a battle gets at most one vote however the votes race."""

    description: str

    @abc.abstractmethod
    async def create_battle(self, battle: Battle) -> None:
        """Store a new battle (and forget battles left unvoted past BATTLE_TTL_SECONDS)."""

    @abc.abstractmethod
    async def get_battle(self, battle_id: str) -> Battle | None:
        """The battle, or None when there is none by that id."""

    @abc.abstractmethod
    async def _mark_asked(self, battle_id: str, side: str) -> Battle: ...

    @abc.abstractmethod
    async def _record_vote(self, battle_id: str, winner: str, at: float) -> Vote: ...

    @abc.abstractmethod
    async def votes(self) -> list[Vote]:
        """Every vote, oldest first."""

    @abc.abstractmethod
    async def _record_mtbench(self, scores: Sequence[MTBenchScore], at: float) -> None: ...

    @abc.abstractmethod
    async def mtbench_scores(self) -> list[MTBenchScore]:
        """The latest score per (model, judge), the most recently recorded last."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; the store is unusable afterwards."""

    async def mark_asked(self, battle_id: str, side: str) -> Battle:
        """Note that `side` was asked to answer; BattleNotFoundError or BattleDecidedError when
        the battle cannot take answers."""
        if side not in SIDES:
            raise ValueError(f"side must be one of {', '.join(SIDES)}, got {side!r}")
        return await self._mark_asked(battle_id, side)

    async def record_vote(self, battle_id: str, winner: str, at: float | None = None) -> Vote:
        """Decide the battle, once: BattleNotFoundError, BattleDecidedError (a second vote, from
        this gateway or another) or BattleNotReadyError (a side not asked yet) otherwise."""
        if winner not in WINNERS:
            raise ValueError(f"winner must be one of {', '.join(WINNERS)}, got {winner!r}")
        return await self._record_vote(battle_id, winner, time.time() if at is None else at)

    async def record_mtbench(self, scores: Sequence[MTBenchScore]) -> None:
        """Keep these scores, replacing earlier ones of the same (model, judge)."""
        if scores:
            await self._record_mtbench(scores, time.time())

    async def __aenter__(self) -> LeaderboardStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _battle(row: Sequence[Any]) -> Battle:
    battle_id, model_a, model_b, created, asked_a, asked_b, winner = row
    asked = frozenset(side for side, flag in (("a", asked_a), ("b", asked_b)) if flag)
    return Battle(battle_id, model_a, model_b, float(created), asked, winner)


def _not_votable(battle: Battle | None, battle_id: str) -> Exception:
    """Why a vote (or an answer) was refused, from the battle as it is now."""
    if battle is None:
        return BattleNotFoundError(battle_id)
    if battle.winner is not None:
        return BattleDecidedError(battle_id)
    return BattleNotReadyError(battle_id)


_ASKED_COLUMN = {"a": "asked_a", "b": "asked_b"}
_BATTLE_COLUMNS = "id, model_a, model_b, created, asked_a, asked_b, winner"
_WINNER_CHECK = "CHECK (winner IN ('a', 'b', 'tie', 'both_bad'))"


# --- SQLite ----------------------------------------------------------------------------------

# `votes` keeps the layout of earlier chatfleet releases, so their files keep their votes.
_SQLITE_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS votes (
    battle_id TEXT PRIMARY KEY,
    model_a   TEXT NOT NULL,
    model_b   TEXT NOT NULL,
    winner    TEXT NOT NULL {_WINNER_CHECK},
    created   REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS battles (
    id      TEXT PRIMARY KEY,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    created REAL NOT NULL,
    asked_a INTEGER NOT NULL DEFAULT 0,
    asked_b INTEGER NOT NULL DEFAULT 0,
    winner  TEXT {_WINNER_CHECK}
);
CREATE INDEX IF NOT EXISTS battles_open ON battles (created) WHERE winner IS NULL;
CREATE TABLE IF NOT EXISTS mtbench_scores (
    model     TEXT NOT NULL,
    judge     TEXT NOT NULL,
    score     REAL NOT NULL,
    questions INTEGER NOT NULL,
    unparsed  INTEGER NOT NULL,
    recorded  REAL NOT NULL,
    PRIMARY KEY (model, judge)
);
"""


class SQLiteStore(LeaderboardStore):
    """A SQLite file. Each call opens its own connection in a worker thread, so the event loop
    never waits on the disk and no connection is shared between threads; writes take the
    database lock up front (BEGIN IMMEDIATE), so gateways sharing the file on one host cannot
    both decide a battle. The file (and its folder) appears with the first write: a gateway
    whose arena is never used writes nothing."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.description = f"SQLite file {self.path}"

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Autocommit mode: transactions are the explicit BEGIN IMMEDIATE ... COMMIT below.
            connection = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        except (OSError, sqlite3.Error) as error:
            raise _failed(self.description, error) from error
        try:
            connection.executescript(_SQLITE_SCHEMA)
            yield connection
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as error:
            raise _failed(self.description, error) from error
        finally:
            connection.close()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connection() as connection:
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    async def _run(self, call: Callable[[], T]) -> T:
        return await asyncio.to_thread(call)

    # Blocking bodies, run in a thread by the async methods.

    def _select_battle(self, connection: sqlite3.Connection, battle_id: str) -> Battle | None:
        row = connection.execute(
            f"SELECT {_BATTLE_COLUMNS} FROM battles WHERE id = ?", (battle_id,)
        ).fetchone()
        return None if row is None else _battle(row)

    def _create_sync(self, battle: Battle) -> None:
        with self._transaction() as connection:
            connection.execute(
                "DELETE FROM battles WHERE winner IS NULL AND created < ?",
                (battle.created - BATTLE_TTL_SECONDS,),
            )
            connection.execute(
                f"INSERT INTO battles ({_BATTLE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    battle.id,
                    battle.model_a,
                    battle.model_b,
                    battle.created,
                    "a" in battle.asked,
                    "b" in battle.asked,
                    battle.winner,
                ),
            )

    def _get_sync(self, battle_id: str) -> Battle | None:
        if not self.path.exists():
            return None  # reading creates nothing
        with self._connection() as connection:
            return self._select_battle(connection, battle_id)

    def _mark_asked_sync(self, battle_id: str, side: str) -> Battle:
        if not self.path.exists():
            raise BattleNotFoundError(battle_id)
        with self._transaction() as connection:
            column = _ASKED_COLUMN[side]
            updated = connection.execute(
                f"UPDATE battles SET {column} = 1 WHERE id = ? AND winner IS NULL", (battle_id,)
            ).rowcount
            battle = self._select_battle(connection, battle_id)
            if not updated or battle is None:
                raise _not_votable(battle, battle_id)
            return battle

    def _vote_sync(self, battle_id: str, winner: str, at: float) -> Vote:
        if not self.path.exists():
            raise BattleNotFoundError(battle_id)
        with self._transaction() as connection:
            updated = connection.execute(
                "UPDATE battles SET winner = ? "
                "WHERE id = ? AND winner IS NULL AND asked_a = 1 AND asked_b = 1",
                (winner, battle_id),
            ).rowcount
            battle = self._select_battle(connection, battle_id)
            if not updated or battle is None:
                raise _not_votable(battle, battle_id)
            vote = Vote(battle_id, battle.model_a, battle.model_b, winner, at)
            try:
                connection.execute(
                    "INSERT INTO votes (battle_id, model_a, model_b, winner, created) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (vote.battle_id, vote.model_a, vote.model_b, vote.winner, vote.created),
                )
            except sqlite3.IntegrityError as error:
                raise BattleDecidedError(battle_id) from error
            return vote

    def _votes_sync(self) -> list[Vote]:
        if not self.path.exists():
            return []
        with self._connection() as connection:
            rows = connection.execute(
                "SELECT battle_id, model_a, model_b, winner, created FROM votes ORDER BY rowid"
            ).fetchall()
        return [Vote(*row) for row in rows]

    def _record_mtbench_sync(self, scores: Sequence[MTBenchScore], at: float) -> None:
        with self._transaction() as connection:
            connection.executemany(
                _qmarks(_UPSERT_MTBENCH),
                [(s.model, s.judge, s.score, s.questions, s.unparsed, at) for s in scores],
            )

    def _mtbench_sync(self) -> list[MTBenchScore]:
        if not self.path.exists():
            return []
        with self._connection() as connection:
            rows = connection.execute(_SELECT_MTBENCH).fetchall()
        return [MTBenchScore(*row) for row in rows]

    # The interface.

    async def create_battle(self, battle: Battle) -> None:
        await self._run(lambda: self._create_sync(battle))

    async def get_battle(self, battle_id: str) -> Battle | None:
        return await self._run(lambda: self._get_sync(battle_id))

    async def _mark_asked(self, battle_id: str, side: str) -> Battle:
        return await self._run(lambda: self._mark_asked_sync(battle_id, side))

    async def _record_vote(self, battle_id: str, winner: str, at: float) -> Vote:
        return await self._run(lambda: self._vote_sync(battle_id, winner, at))

    async def votes(self) -> list[Vote]:
        return await self._run(self._votes_sync)

    async def _record_mtbench(self, scores: Sequence[MTBenchScore], at: float) -> None:
        await self._run(lambda: self._record_mtbench_sync(scores, at))

    async def mtbench_scores(self) -> list[MTBenchScore]:
        return await self._run(self._mtbench_sync)

    async def close(self) -> None:
        """Nothing stays open between calls."""


_UPSERT_MTBENCH = (
    "INSERT INTO mtbench_scores (model, judge, score, questions, unparsed, recorded) "
    "VALUES ($1, $2, $3, $4, $5, $6) "
    "ON CONFLICT (model, judge) DO UPDATE SET score = excluded.score, "
    "questions = excluded.questions, unparsed = excluded.unparsed, recorded = excluded.recorded"
)


def _qmarks(sql: str) -> str:
    """PostgreSQL's numbered parameters ($1, $2, ...) as SQLite's `?` (used in order)."""
    return re.sub(r"\$\d+", "?", sql)


_SELECT_MTBENCH = (
    "SELECT model, judge, score, questions, unparsed FROM mtbench_scores "
    "ORDER BY recorded, model, judge"
)


# --- PostgreSQL ------------------------------------------------------------------------------

_POSTGRES_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS battles (
    id      TEXT PRIMARY KEY,
    model_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    asked_a BOOLEAN NOT NULL DEFAULT FALSE,
    asked_b BOOLEAN NOT NULL DEFAULT FALSE,
    winner  TEXT {_WINNER_CHECK}
);
CREATE INDEX IF NOT EXISTS battles_open ON battles (created) WHERE winner IS NULL;
CREATE TABLE IF NOT EXISTS votes (
    seq       BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    battle_id TEXT NOT NULL UNIQUE,
    model_a   TEXT NOT NULL,
    model_b   TEXT NOT NULL,
    winner    TEXT NOT NULL {_WINNER_CHECK},
    created   DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS mtbench_scores (
    model     TEXT NOT NULL,
    judge     TEXT NOT NULL,
    score     DOUBLE PRECISION NOT NULL,
    questions INTEGER NOT NULL,
    unparsed  INTEGER NOT NULL,
    recorded  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (model, judge)
);
"""
# Taken while the tables are created: two gateways starting at once would otherwise race on
# CREATE TABLE IF NOT EXISTS (a unique violation in pg_type). Any constant; this one spells
# "chatflet".
_SCHEMA_LOCK_KEY = 0x63686174666C6574
# What asyncpg raises when the server is unreachable or a statement fails.
_POSTGRES_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class PostgresStore(LeaderboardStore):
    """PostgreSQL through an asyncpg pool. A vote is one atomic UPDATE ... WHERE winner IS NULL in
    a transaction with its insert: when two gateways race on a battle, the row lock makes the
    second see the first's winner and refuse."""

    def __init__(self, pool: asyncpg.Pool, description: str) -> None:
        self._pool = pool
        self.description = description

    @classmethod
    async def connect(
        cls, dsn: str, *, timeout: float = 10.0, max_connections: int = 10
    ) -> PostgresStore:
        description = f"PostgreSQL database {redact(dsn)}"
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=1, max_size=max_connections, timeout=timeout, command_timeout=30
            )
        except (*_POSTGRES_ERRORS, ValueError) as error:
            raise StoreUnavailableError(f"cannot connect to the {description}: {error}") from error
        store = cls(pool, description)
        try:
            await store._create_schema()
        except BaseException:
            await pool.close()
            raise
        return store

    @contextlib.asynccontextmanager
    async def _connection(self, *, transaction: bool = False) -> AsyncIterator[Any]:
        try:
            async with self._pool.acquire() as connection:
                if not transaction:
                    yield connection
                    return
                async with connection.transaction():
                    yield connection
        except _POSTGRES_ERRORS as error:
            raise _failed(self.description, error) from error

    async def _create_schema(self) -> None:
        async with self._connection(transaction=True) as connection:
            await connection.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_KEY)
            await connection.execute(_POSTGRES_SCHEMA)

    @staticmethod
    async def _select_battle(connection: Any, battle_id: str) -> Battle | None:
        row = await connection.fetchrow(
            f"SELECT {_BATTLE_COLUMNS} FROM battles WHERE id = $1", battle_id
        )
        return None if row is None else _battle(tuple(row))

    async def create_battle(self, battle: Battle) -> None:
        async with self._connection(transaction=True) as connection:
            await connection.execute(
                "DELETE FROM battles WHERE winner IS NULL AND created < $1",
                battle.created - BATTLE_TTL_SECONDS,
            )
            await connection.execute(
                f"INSERT INTO battles ({_BATTLE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                battle.id,
                battle.model_a,
                battle.model_b,
                battle.created,
                "a" in battle.asked,
                "b" in battle.asked,
                battle.winner,
            )

    async def get_battle(self, battle_id: str) -> Battle | None:
        async with self._connection() as connection:
            return await self._select_battle(connection, battle_id)

    async def _mark_asked(self, battle_id: str, side: str) -> Battle:
        async with self._connection(transaction=True) as connection:
            row = await connection.fetchrow(
                f"UPDATE battles SET {_ASKED_COLUMN[side]} = TRUE "
                f"WHERE id = $1 AND winner IS NULL RETURNING {_BATTLE_COLUMNS}",
                battle_id,
            )
            if row is None:
                raise _not_votable(await self._select_battle(connection, battle_id), battle_id)
            return _battle(tuple(row))

    async def _record_vote(self, battle_id: str, winner: str, at: float) -> Vote:
        async with self._connection(transaction=True) as connection:
            row = await connection.fetchrow(
                "UPDATE battles SET winner = $2 "
                "WHERE id = $1 AND winner IS NULL AND asked_a AND asked_b "
                "RETURNING model_a, model_b",
                battle_id,
                winner,
            )
            if row is None:
                raise _not_votable(await self._select_battle(connection, battle_id), battle_id)
            vote = Vote(battle_id, row["model_a"], row["model_b"], winner, at)
            await connection.execute(
                "INSERT INTO votes (battle_id, model_a, model_b, winner, created) "
                "VALUES ($1, $2, $3, $4, $5)",
                vote.battle_id,
                vote.model_a,
                vote.model_b,
                vote.winner,
                vote.created,
            )
            return vote

    async def votes(self) -> list[Vote]:
        async with self._connection() as connection:
            rows = await connection.fetch(
                "SELECT battle_id, model_a, model_b, winner, created FROM votes ORDER BY seq"
            )
        return [Vote(*tuple(row)) for row in rows]

    async def _record_mtbench(self, scores: Sequence[MTBenchScore], at: float) -> None:
        async with self._connection(transaction=True) as connection:
            await connection.executemany(
                _UPSERT_MTBENCH,
                [(s.model, s.judge, s.score, s.questions, s.unparsed, at) for s in scores],
            )

    async def mtbench_scores(self) -> list[MTBenchScore]:
        async with self._connection() as connection:
            rows = await connection.fetch(_SELECT_MTBENCH)
        return [MTBenchScore(*tuple(row)) for row in rows]

    async def close(self) -> None:
        await self._pool.close()
