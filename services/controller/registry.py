"""The controller's view of the fleet: registered workers, their models, health state and load.

Plain data, no gRPC: the servicer converts protobuf at its edge and the health watcher sets states.
Watchers of the fleet (`changes()`) are woken by the mutations themselves, so nothing polls.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass, field, replace


class WorkerState(enum.Enum):
    """What the controller knows of a worker's health (mirrors controller.proto's WorkerState)."""

    UNKNOWN = "unknown"  # registered, no health report yet
    SERVING = "serving"
    NOT_SERVING = "not_serving"
    UNREACHABLE = "unreachable"


class ModelKind(enum.Enum):
    GENERATE = "generate"
    EMBED = "embed"


@dataclass(frozen=True)
class ModelInfo:
    """One model as a worker serves it."""

    name: str
    kind: ModelKind = ModelKind.GENERATE
    context_length: int = 0
    supports_chat: bool = False
    supports_embeddings: bool = False
    aliases: tuple[str, ...] = ()
    source: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        """The canonical name followed by the aliases."""
        return (self.name, *self.aliases)


@dataclass(frozen=True)
class Load:
    running: int = 0
    waiting: int = 0
    capacity: int = 0

    @property
    def queue_ratio(self) -> float:
        """Outstanding requests per slot; a worker reporting no capacity counts as one slot."""
        return (self.running + self.waiting) / max(self.capacity, 1)


@dataclass
class WorkerRecord:
    """One registered worker. Mutated only through WorkerRegistry."""

    address: str
    models: tuple[ModelInfo, ...]
    load: Load = field(default_factory=Load)
    state: WorkerState = WorkerState.UNKNOWN

    def model(self, name: str) -> ModelInfo | None:
        """The model this worker serves under `name` (canonical name or alias)."""
        for info in self.models:
            if name in info.names:
                return info
        return None


class WorkerRegistry:
    """Workers by address, and the addresses serving each model name or alias."""

    def __init__(self) -> None:
        self._workers: dict[str, WorkerRecord] = {}
        self._by_model: dict[str, set[str]] = {}
        # One event per running changes() iterator, set by every change of the fleet.
        self._watchers: set[asyncio.Event] = set()
        self._closed = False

    def __contains__(self, address: object) -> bool:
        return address in self._workers

    def __len__(self) -> int:
        return len(self._workers)

    def register(self, address: str, models: Sequence[ModelInfo], load: Load) -> bool:
        """Add a worker, or refresh its models and load when the address is known (its health
        state is kept: the watcher owns it). Returns True when the worker is new."""
        existing = self._workers.pop(address, None)
        if existing is not None:
            self._unindex(existing)
        record = WorkerRecord(
            address=address,
            models=tuple(models),
            load=load,
            state=existing.state if existing is not None else WorkerState.UNKNOWN,
        )
        self._workers[address] = record
        for info in record.models:
            for name in info.names:
                self._by_model.setdefault(name, set()).add(address)
        if existing is None or existing.models != record.models:
            self._changed()
        return existing is None

    def deregister(self, address: str) -> bool:
        """Remove a worker. Returns False when it was not registered."""
        record = self._workers.pop(address, None)
        if record is None:
            return False
        self._unindex(record)
        self._changed()
        return True

    def update_load(self, address: str, load: Load) -> bool:
        """Record a worker's load. Returns False when the worker is not registered."""
        record = self._workers.get(address)
        if record is None:
            return False
        record.load = load
        return True

    def set_state(self, address: str, state: WorkerState) -> WorkerState | None:
        """Record a worker's health; returns the previous state, or None when not registered."""
        record = self._workers.get(address)
        if record is None:
            return None
        previous, record.state = record.state, state
        if previous is not state:
            self._changed()
        return previous

    def get(self, address: str) -> WorkerRecord | None:
        return self._workers.get(address)

    def state(self, address: str) -> WorkerState | None:
        record = self._workers.get(address)
        return None if record is None else record.state

    def workers(self) -> list[WorkerRecord]:
        """Every registered worker, sorted by address."""
        return [self._workers[address] for address in sorted(self._workers)]

    def workers_for(self, model: str) -> list[WorkerRecord]:
        """The workers serving `model` (a name or an alias) in any state, sorted by address."""
        return [self._workers[address] for address in sorted(self._by_model.get(model, ()))]

    def served_models(self) -> list[ModelInfo]:
        """One entry per name served by at least one SERVING worker, sorted by name. An alias is an
        entry of its own whose aliases are the model's other names."""
        entries: dict[str, ModelInfo] = {}
        for record in self.workers():
            if record.state is not WorkerState.SERVING:
                continue
            for info in record.models:
                for name in info.names:
                    if name not in entries:
                        others = tuple(other for other in info.names if other != name)
                        entries[name] = replace(info, name=name, aliases=others)
        return [entries[name] for name in sorted(entries)]

    async def changes(self) -> AsyncGenerator[None, None]:
        """Yields at once, then after every change of the fleet: a worker added or removed, its
        models or its health state changed (load updates do not count). Changes made while the
        consumer handles one are folded into the next yield. Ends after `close()`; iterate it
        within `contextlib.aclosing` so that an abandoned watch stops being woken."""
        changed = asyncio.Event()
        self._watchers.add(changed)
        try:
            while not self._closed:
                yield
                await changed.wait()
                changed.clear()
        finally:
            self._watchers.discard(changed)

    def close(self) -> None:
        """End every changes() iterator (the controller is shutting down: its server's graceful
        stop would otherwise wait for the streams built on them)."""
        self._closed = True
        self._changed()

    def _changed(self) -> None:
        for changed in self._watchers:
            changed.set()

    def _unindex(self, record: WorkerRecord) -> None:
        for name in _names(record.models):
            addresses = self._by_model.get(name)
            if addresses is not None:
                addresses.discard(record.address)
                if not addresses:
                    del self._by_model[name]


def _names(models: Iterable[ModelInfo]) -> set[str]:
    return {name for info in models for name in info.names}
