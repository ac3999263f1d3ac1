"""The leaderboard as the gateway serves it: arena ratings from the store's votes beside the
models' MT-bench scores, recomputed only when the votes change."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

from services.leaderboard.ratings import BOOTSTRAP_ROUNDS, BOOTSTRAP_SEED, standings
from services.leaderboard.store import LeaderboardStore, MTBenchScore


@dataclass(frozen=True)
class BoardEntry:
    """One model: arena ratings (None without votes) and its latest MT-bench score, if any."""

    model: str
    rank: int | None = None
    rating: float | None = None
    ci_lower: float | None = None
    ci_upper: float | None = None
    elo: float | None = None
    votes: int = 0
    wins: int = 0
    losses: int = 0
    ties: int = 0
    mt_bench: MTBenchScore | None = None


@dataclass(frozen=True)
class Board:
    total_votes: int
    bootstrap_rounds: int
    entries: list[BoardEntry]


class Leaderboard:
    """Reads the store and ranks the models. The bootstrap (seconds for tens of models and
    thousands of votes) runs in a thread, once per new set of votes: requests in between get the
    cached ratings. The seed is fixed, so every replica shows the same intervals."""

    def __init__(
        self,
        store: LeaderboardStore,
        *,
        bootstrap_rounds: int = BOOTSTRAP_ROUNDS,
        seed: int = BOOTSTRAP_SEED,
    ) -> None:
        self.store = store
        self.bootstrap_rounds = bootstrap_rounds
        self._seed = seed
        self._lock = asyncio.Lock()
        self._cached: tuple[tuple[int, str | None], list[BoardEntry]] | None = None

    async def _rated(self) -> tuple[int, list[BoardEntry]]:
        votes = await self.store.votes()
        # Votes are only ever appended: their count and the last one identify the set.
        key = (len(votes), votes[-1].battle_id if votes else None)
        async with self._lock:
            if self._cached is None or self._cached[0] != key:
                table = await asyncio.to_thread(
                    standings, votes, rounds=self.bootstrap_rounds, seed=self._seed
                )
                entries = [
                    BoardEntry(
                        model=s.model,
                        rank=rank,
                        rating=s.rating,
                        ci_lower=s.ci_lower,
                        ci_upper=s.ci_upper,
                        elo=s.elo,
                        votes=s.votes,
                        wins=s.wins,
                        losses=s.losses,
                        ties=s.ties,
                    )
                    for rank, s in enumerate(table, start=1)
                ]
                self._cached = (key, entries)
            return len(votes), self._cached[1]

    async def board(self) -> Board:
        """Models with votes, best rating first, then models with only an MT-bench score, best
        score first. A model's MT-bench column is its most recently recorded score that rated at
        least one answer (whichever the judge)."""
        total, rated = await self._rated()
        latest: dict[str, MTBenchScore] = {}
        for score in await self.store.mtbench_scores():  # oldest first: the latest wins
            if score.questions > 0:
                latest[score.model] = score
        entries = [replace(e, mt_bench=latest.get(e.model)) for e in rated]
        seen = {e.model for e in rated}
        unrated = sorted(
            (s for model, s in latest.items() if model not in seen),
            key=lambda s: (-s.score, s.model),
        )
        entries += [BoardEntry(model=s.model, mt_bench=s) for s in unrated]
        return Board(total, self.bootstrap_rounds, entries)
