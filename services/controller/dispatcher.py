"""Picks a healthy worker for a model: shortest queue, or a lottery weighted by capacity."""

from __future__ import annotations

import enum
import random
from collections.abc import Collection
from dataclasses import dataclass

from services.common.errors import ModelNotFoundError, UnavailableError
from services.controller.registry import ModelInfo, WorkerRecord, WorkerRegistry, WorkerState


class DispatchMethod(enum.Enum):
    SHORTEST_QUEUE = "shortest_queue"
    LOTTERY = "lottery"


@dataclass(frozen=True)
class Selection:
    """The chosen worker and the model as that worker serves it."""

    address: str
    model: ModelInfo


class Dispatcher:
    """Chooses workers from a WorkerRegistry; the random generator is injected so tests seed it."""

    def __init__(
        self,
        registry: WorkerRegistry,
        default_method: DispatchMethod = DispatchMethod.SHORTEST_QUEUE,
        rng: random.Random | None = None,
    ) -> None:
        self._registry = registry
        self.default_method = default_method
        self._rng = rng or random.Random()

    def select(
        self,
        model: str,
        method: DispatchMethod | None = None,
        exclude: Collection[str] = (),
    ) -> Selection:
        """A SERVING worker for `model`, avoiding `exclude` unless only excluded ones are SERVING.

        Raises ModelNotFoundError when no registered worker serves the model and UnavailableError
        when some do but none is SERVING.
        """
        candidates = self._registry.workers_for(model)
        if not candidates:
            raise ModelNotFoundError(f"the model '{model}' does not exist", param="model")
        serving = [record for record in candidates if record.state is WorkerState.SERVING]
        if not serving:
            raise UnavailableError(
                f"no healthy worker serves the model '{model}' right now; retry shortly"
            )
        preferred = [record for record in serving if record.address not in exclude]
        chosen = self._choose(preferred or serving, method or self.default_method)
        info = chosen.model(model)
        assert info is not None  # workers_for() only returns workers serving the model
        return Selection(address=chosen.address, model=info)

    def _choose(self, workers: list[WorkerRecord], method: DispatchMethod) -> WorkerRecord:
        if method is DispatchMethod.LOTTERY:
            weights = [record.load.capacity for record in workers]
            if sum(weights) <= 0:
                return self._rng.choice(workers)
            return self._rng.choices(workers, weights=weights)[0]
        lowest = min(record.load.queue_ratio for record in workers)
        return self._rng.choice([r for r in workers if r.load.queue_ratio == lowest])
