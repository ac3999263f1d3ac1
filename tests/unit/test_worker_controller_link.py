"""The worker's health Watch on the controller: a restarted controller learns of the worker without
waiting for a heartbeat, and the Watch never holds up the controller's graceful stop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from services.controller.config import ControllerConfig
from services.controller.main import Controller
from services.controller.registry import WorkerState
from services.worker.main import Worker
from tests.unit.fakes import FakeEngine, worker_config

WAIT_S = 10.0
# Far beyond WAIT_S: only the health Watch can bring the worker back within a test.
NO_HEARTBEAT_S = 3600


def controller_config(port: int = 0) -> ControllerConfig:
    return ControllerConfig(port=port, heartbeat_interval=NO_HEARTBEAT_S)


@pytest.fixture
async def controller() -> AsyncIterator[Controller]:
    started = await Controller.start(controller_config())
    try:
        yield started
    finally:
        await started.stop(grace=0)


@pytest.fixture
async def worker(controller: Controller) -> AsyncIterator[Worker]:
    config = worker_config(controller.address, heartbeat_interval=NO_HEARTBEAT_S)
    started = await Worker.start(config, engines=[FakeEngine("fake-chat")])
    try:
        yield started
    finally:
        await started.stop()


async def crash(controller: Controller) -> None:
    """Stop serving at once, without saying NOT_SERVING first (as a killed process would)."""
    await controller.watcher.close()
    await controller.grpc.server.stop(None)


@pytest.mark.parametrize("graceful", [True, False], ids=["graceful-stop", "crash"])
async def test_worker_registers_with_a_restarted_controller_before_any_heartbeat(
    controller: Controller, worker: Worker, graceful: bool
) -> None:
    assert controller.registry.state(worker.address) is WorkerState.SERVING
    port = controller.port
    if graceful:
        await controller.stop(grace=0)
    else:
        await crash(controller)
    restarted = await Controller.start(controller_config(port))
    try:
        state = await restarted.watcher.wait_for_state(
            worker.address, {WorkerState.SERVING}, WAIT_S
        )
        assert state is WorkerState.SERVING
        record = restarted.registry.get(worker.address)
        assert record is not None
        assert [m.name for m in record.models] == ["fake-chat"]
    finally:
        await restarted.stop(grace=0)


async def test_worker_registers_with_a_controller_started_after_it() -> None:
    placeholder = await Controller.start(controller_config())
    port = placeholder.port
    await placeholder.stop(grace=0)  # nothing listens on `port` now
    config = worker_config(f"127.0.0.1:{port}", heartbeat_interval=NO_HEARTBEAT_S)
    worker = await Worker.start(config, engines=[FakeEngine()])
    controller = None
    try:
        assert worker.link is not None
        assert not worker.link.registered.is_set()
        controller = await Controller.start(controller_config(port))
        state = await controller.watcher.wait_for_state(
            worker.address, {WorkerState.SERVING}, WAIT_S
        )
        assert state is WorkerState.SERVING
    finally:
        await worker.stop()
        if controller is not None:
            await controller.stop(grace=0)


async def test_worker_watch_does_not_hold_up_the_controllers_graceful_stop(
    controller: Controller, worker: Worker
) -> None:
    # The worker drops its Watch when the controller goes NOT_SERVING; were the stream kept open,
    # stop() would wait out the whole grace period.
    await asyncio.wait_for(controller.stop(grace=10 * WAIT_S), WAIT_S)
