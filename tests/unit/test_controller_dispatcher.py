"""WorkerRegistry and Dispatcher, directly: no gRPC."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
from collections.abc import AsyncIterator

import pytest

from services.common.errors import ModelNotFoundError, UnavailableError
from services.controller.dispatcher import Dispatcher, DispatchMethod
from services.controller.registry import (
    Load,
    ModelInfo,
    ModelKind,
    WorkerRegistry,
    WorkerState,
)

CHAT = ModelInfo(name="chat", aliases=("chat-alias",), context_length=2048, supports_chat=True)
EMBED = ModelInfo(name="embed", kind=ModelKind.EMBED, supports_embeddings=True)


def registry_with(*workers: tuple[str, Load, WorkerState]) -> WorkerRegistry:
    registry = WorkerRegistry()
    for address, load, state in workers:
        registry.register(address, [CHAT], load)
        registry.set_state(address, state)
    return registry


def serving(address: str, running: int = 0, waiting: int = 0, capacity: int = 4) -> tuple:
    return (address, Load(running, waiting, capacity), WorkerState.SERVING)


class TestRegistry:
    def test_register_indexes_names_and_aliases(self) -> None:
        registry = WorkerRegistry()
        assert registry.register("w1:1", [CHAT, EMBED], Load(0, 0, 4)) is True
        assert [r.address for r in registry.workers_for("chat")] == ["w1:1"]
        assert [r.address for r in registry.workers_for("chat-alias")] == ["w1:1"]
        assert [r.address for r in registry.workers_for("embed")] == ["w1:1"]
        assert registry.workers_for("other") == []
        assert registry.state("w1:1") is WorkerState.UNKNOWN

    def test_reregistering_refreshes_models_and_keeps_state(self) -> None:
        registry = WorkerRegistry()
        registry.register("w1:1", [CHAT, EMBED], Load(0, 0, 4))
        registry.set_state("w1:1", WorkerState.SERVING)
        assert registry.register("w1:1", [EMBED], Load(1, 0, 4)) is False
        assert registry.workers_for("chat") == []
        record = registry.get("w1:1")
        assert record is not None
        assert record.state is WorkerState.SERVING
        assert record.load == Load(1, 0, 4)

    def test_deregister_removes_worker_and_its_names(self) -> None:
        registry = WorkerRegistry()
        registry.register("w1:1", [CHAT], Load())
        assert registry.deregister("w1:1") is True
        assert registry.deregister("w1:1") is False
        assert "w1:1" not in registry
        assert registry.workers_for("chat") == []
        assert registry.workers_for("chat-alias") == []

    def test_unknown_worker_updates_are_refused(self) -> None:
        registry = WorkerRegistry()
        assert registry.update_load("nope:1", Load()) is False
        assert registry.set_state("nope:1", WorkerState.SERVING) is None

    def test_served_models_lists_names_of_serving_workers_with_aliases_as_entries(self) -> None:
        registry = WorkerRegistry()
        registry.register("w1:1", [CHAT], Load())
        registry.register("w2:1", [EMBED], Load())
        registry.set_state("w1:1", WorkerState.SERVING)
        registry.set_state("w2:1", WorkerState.NOT_SERVING)
        served = registry.served_models()
        assert [m.name for m in served] == ["chat", "chat-alias"]
        assert served[1].aliases == ("chat",)
        assert served[1].context_length == 2048

    def test_workers_are_sorted_by_address(self) -> None:
        registry = registry_with(serving("b:1"), serving("a:1"), serving("c:1"))
        assert [r.address for r in registry.workers()] == ["a:1", "b:1", "c:1"]


class Wakeups:
    """Whether a registry's changes() iterator has been woken since its last yield, checked
    without waiting: its next item is awaited in a task kept across checks (cancelling it would
    end the iterator)."""

    def __init__(self, changes: AsyncIterator[None]) -> None:
        self._changes = changes
        self._pending: asyncio.Future[None] | None = None

    async def woken(self) -> bool:
        if self._pending is None:
            self._pending = asyncio.ensure_future(anext(self._changes))
        # Enough turns of the loop for a woken iterator to reach its next yield.
        for _ in range(3):
            await asyncio.sleep(0)
        if not self._pending.done():
            return False
        self._pending.result()
        self._pending = None
        return True

    async def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pending


class TestRegistryChanges:
    async def test_fleet_changes_wake_watchers_and_load_updates_do_not(self) -> None:
        registry = WorkerRegistry()
        async with contextlib.aclosing(registry.changes()) as changes:
            await anext(changes)  # at once: the current fleet
            watch = Wakeups(changes)
            try:
                assert not await watch.woken()
                registry.register("w1:1", [CHAT], Load(0, 0, 4))
                assert await watch.woken()
                registry.update_load("w1:1", Load(3, 0, 4))
                registry.register("w1:1", [CHAT], Load(1, 0, 4))  # a refresh, same models
                registry.set_state("w1:1", WorkerState.UNKNOWN)  # the state it already has
                assert not await watch.woken()
                registry.register("w1:1", [CHAT, EMBED], Load(1, 0, 4))
                assert await watch.woken()
                registry.set_state("w1:1", WorkerState.SERVING)
                registry.set_state("w1:1", WorkerState.NOT_SERVING)  # folded into one wake-up
                assert await watch.woken()
                assert not await watch.woken()
                registry.deregister("w1:1")
                assert await watch.woken()
                registry.deregister("w1:1")  # not registered: nothing changes
                assert not await watch.woken()
            finally:
                await watch.close()

    async def test_close_ends_every_watch(self) -> None:
        registry = WorkerRegistry()
        first, second = registry.changes(), registry.changes()
        await anext(first)
        await anext(second)
        registry.close()
        assert [item async for item in first] == []
        assert [item async for item in second] == []
        assert [item async for item in registry.changes()] == []


class TestShortestQueue:
    def test_picks_the_least_loaded_relative_to_capacity(self) -> None:
        registry = registry_with(
            serving("busy:1", running=4, waiting=2, capacity=4),  # 1.5
            serving("big:1", running=4, waiting=0, capacity=16),  # 0.25
            serving("small:1", running=1, waiting=0, capacity=2),  # 0.5
        )
        dispatcher = Dispatcher(registry, rng=random.Random(0))
        for _ in range(10):
            assert dispatcher.select("chat").address == "big:1"

    def test_ties_are_broken_at_random(self) -> None:
        registry = registry_with(serving("a:1"), serving("b:1"), serving("c:1", running=1))
        dispatcher = Dispatcher(registry, rng=random.Random(1))
        picked = {dispatcher.select("chat").address for _ in range(50)}
        assert picked == {"a:1", "b:1"}

    def test_returns_the_model_as_the_worker_serves_it(self) -> None:
        dispatcher = Dispatcher(registry_with(serving("a:1")))
        selection = dispatcher.select("chat-alias")
        assert selection.model.name == "chat"
        assert selection.model.aliases == ("chat-alias",)

    def test_skips_workers_that_are_not_serving(self) -> None:
        registry = registry_with(
            ("down:1", Load(0, 0, 64), WorkerState.UNREACHABLE),
            ("draining:1", Load(0, 0, 64), WorkerState.NOT_SERVING),
            ("new:1", Load(0, 0, 64), WorkerState.UNKNOWN),
            serving("up:1", running=10, capacity=1),
        )
        assert Dispatcher(registry).select("chat").address == "up:1"


class TestLottery:
    def test_distribution_follows_capacity(self) -> None:
        registry = registry_with(serving("small:1", capacity=1), serving("big:1", capacity=3))
        dispatcher = Dispatcher(registry, DispatchMethod.LOTTERY, rng=random.Random(1234))
        counts = collections.Counter(dispatcher.select("chat").address for _ in range(4000))
        assert 0.70 < counts["big:1"] / 4000 < 0.80

    def test_ignores_load(self) -> None:
        registry = registry_with(serving("a:1", running=100, capacity=1), serving("b:1"))
        dispatcher = Dispatcher(registry, rng=random.Random(5))
        picked = {dispatcher.select("chat", DispatchMethod.LOTTERY).address for _ in range(200)}
        assert picked == {"a:1", "b:1"}

    def test_workers_without_capacity_are_drawn_uniformly(self) -> None:
        registry = registry_with(serving("a:1", capacity=0), serving("b:1", capacity=0))
        dispatcher = Dispatcher(registry, DispatchMethod.LOTTERY, rng=random.Random(3))
        assert {dispatcher.select("chat").address for _ in range(100)} == {"a:1", "b:1"}


class TestExclude:
    @pytest.mark.parametrize("method", list(DispatchMethod))
    def test_excluded_worker_is_avoided_when_another_serves(self, method: DispatchMethod) -> None:
        registry = registry_with(serving("idle:1"), serving("busy:1", running=3, capacity=4))
        dispatcher = Dispatcher(registry, method, rng=random.Random(0))
        for _ in range(20):
            assert dispatcher.select("chat", exclude={"idle:1"}).address == "busy:1"

    def test_excluded_worker_is_used_when_it_is_the_only_serving_one(self) -> None:
        registry = registry_with(
            serving("only:1"), ("down:1", Load(0, 0, 4), WorkerState.UNREACHABLE)
        )
        assert Dispatcher(registry).select("chat", exclude={"only:1"}).address == "only:1"


class TestErrors:
    def test_unknown_model_is_not_found(self) -> None:
        dispatcher = Dispatcher(registry_with(serving("a:1")))
        with pytest.raises(ModelNotFoundError) as caught:
            dispatcher.select("missing")
        assert caught.value.param == "model"

    @pytest.mark.parametrize(
        "state", [WorkerState.UNKNOWN, WorkerState.NOT_SERVING, WorkerState.UNREACHABLE]
    )
    def test_known_model_without_serving_worker_is_unavailable(self, state: WorkerState) -> None:
        dispatcher = Dispatcher(registry_with(("a:1", Load(0, 0, 4), state)))
        with pytest.raises(UnavailableError):
            dispatcher.select("chat")
