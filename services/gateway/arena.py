"""The arena's core: anonymous battles between two chat models, kept in the leaderboard store so
any gateway replica can carry a battle on and take its vote. Nothing here knows about HTTP."""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from collections.abc import Mapping, Sequence

from services.leaderboard.store import Battle, LeaderboardStore, Vote

logger = logging.getLogger(__name__)

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


def pick_pair(models: Sequence[str], rng: random.Random) -> tuple[str, str]:
    """Two different models at random, in random order; a lone model faces itself."""
    if not models:
        raise ValueError("no models to pick from")
    unique = sorted(set(models))
    if len(unique) == 1:
        return unique[0], unique[0]
    first, second = rng.sample(unique, 2)
    return first, second


class Arena:
    """Starts battles, notes which sides answered and takes votes, all through the store: the
    gateway keeps no battle in memory, so a battle survives a restart and may be voted on
    through another replica. The store's errors (BattleNotFoundError, BattleDecidedError,
    BattleNotReadyError, StoreUnavailableError) pass through for the edge to map."""

    def __init__(self, store: LeaderboardStore, rng: random.Random | None = None) -> None:
        self.store = store
        self._rng = rng or random.Random()

    async def start(self, models: Sequence[str]) -> Battle:
        model_a, model_b = pick_pair(models, self._rng)
        battle = Battle(uuid.uuid4().hex, model_a, model_b, time.time())
        await self.store.create_battle(battle)
        return battle

    async def ask(self, battle_id: str, side: str) -> Battle:
        """The battle, with `side` noted as asked to answer (refused once it is decided)."""
        return await self.store.mark_asked(battle_id, side)

    async def vote(self, battle_id: str, winner: str) -> Vote:
        return await self.store.record_vote(battle_id, winner)
