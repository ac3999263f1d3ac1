"""Hand the MT-bench scores to the leaderboard store the gateways share (services.leaderboard)."""

from __future__ import annotations

from collections.abc import Sequence

from services.common.errors import UnavailableError
from services.eval.errors import EvalError
from services.eval.report import ModelScores


class LeaderboardError(EvalError):
    """The scores could not be recorded (the judgments stay on disk)."""


async def record_scores(url: str, judge: str, rows: Sequence[ModelScores]) -> list[str]:
    """Record each model with at least one rated judgment; returns the models recorded. A model
    whose every judgment was unparsed has no score to show (the table still counts them)."""
    # Imported here: the store brings database drivers the rest of the eval never needs.
    from services.leaderboard.store import MTBenchScore, open_store

    scores = [
        MTBenchScore(
            model=row.model,
            judge=judge,
            score=row.average,
            questions=row.rated,
            unparsed=row.unparsed,
        )
        for row in rows
        if row.average is not None
    ]
    if not scores:
        return []
    try:
        store = await open_store(url)
        try:
            await store.record_mtbench(scores)
        finally:
            await store.close()
    # The store's errors: a URL it cannot open (a ValueError), a database it cannot reach or
    # that fails (UnavailableError), a file it cannot write. Its message hides any password.
    except (ValueError, UnavailableError, OSError) as error:
        raise LeaderboardError(
            f"could not record the MT-bench scores in the leaderboard: {error}"
        ) from error
    return [score.model for score in scores]
