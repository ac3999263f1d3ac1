"""The worker's entry point and controller link: signals, loading, registering again."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from chatfleet.v1 import controller_pb2, controller_pb2_grpc
from services.common.entrypoint import ServiceFailedError
from services.common.grpc_server import insecure_channel
from services.controller.config import ControllerConfig
from services.controller.main import Controller
from services.controller.registry import WorkerState
from services.worker import main as worker_main
from services.worker.main import Worker
from tests.unit.fakes import FakeEngine, worker_config

WAIT_S = 10.0


async def test_serve_sets_ready_and_stops_gracefully_on_sigterm() -> None:
    engine = FakeEngine()
    ready = asyncio.Event()
    serving = asyncio.create_task(worker_main.serve(worker_config(), ready=ready, engines=[engine]))
    await asyncio.wait_for(ready.wait(), WAIT_S)
    assert engine.started
    os.kill(os.getpid(), signal.SIGTERM)  # handled by serve(): a graceful stop, not an exit
    await asyncio.wait_for(serving, WAIT_S)
    assert engine.stopped


async def test_a_failed_engine_stops_the_worker_with_an_error() -> None:
    engine = FakeEngine()
    ready = asyncio.Event()
    serving = asyncio.create_task(worker_main.serve(worker_config(), ready=ready, engines=[engine]))
    await asyncio.wait_for(ready.wait(), WAIT_S)
    engine.broken.set()  # its engine process died, say
    with pytest.raises(ServiceFailedError, match="the fake engine broke"):
        await asyncio.wait_for(serving, WAIT_S)
    assert engine.stopped


async def test_sigterm_while_loading_stops_without_serving() -> None:
    engine = FakeEngine(start_gate=asyncio.Event())  # never opens: loading takes forever
    ready = asyncio.Event()
    serving = asyncio.create_task(worker_main.serve(worker_config(), ready=ready, engines=[engine]))
    await asyncio.wait_for(engine.starting.wait(), WAIT_S)  # signal handlers are in place
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.wait_for(serving, WAIT_S)
    assert not ready.is_set()
    assert engine.stopped


def test_main_rejects_bad_flags() -> None:
    with pytest.raises(SystemExit) as caught:
        worker_main.main(["--model-path", "/a", "--model-path", "/b", "--model-names", "x"])
    assert caught.value.code == 2


async def test_worker_registers_again_when_the_controller_forgets_it() -> None:
    controller = await Controller.start(ControllerConfig(port=0))
    worker = await Worker.start(
        worker_config(controller.address, heartbeat_interval=0.05), engines=[FakeEngine()]
    )
    try:
        assert controller.registry.state(worker.address) is WorkerState.SERVING
        async with insecure_channel(controller.address) as channel:
            stub = controller_pb2_grpc.ControllerServiceStub(channel)
            await stub.DeregisterWorker(
                controller_pb2.DeregisterWorkerRequest(address=worker.address)
            )
        # The next heartbeat is answered with reregister=True.
        state = await controller.watcher.wait_for_state(
            worker.address, {WorkerState.SERVING}, WAIT_S
        )
        assert state is WorkerState.SERVING
    finally:
        await worker.stop()
        await controller.stop(grace=0)


async def test_worker_started_before_the_controller_registers_once_it_is_up() -> None:
    placeholder = await Controller.start(ControllerConfig(port=0))
    port = placeholder.port
    await placeholder.stop(grace=0)  # nothing listens on `port` now
    worker = await Worker.start(
        worker_config(f"127.0.0.1:{port}", heartbeat_interval=0.05), engines=[FakeEngine()]
    )
    controller = None
    try:
        assert worker.link is not None
        assert not worker.link.registered.is_set()
        controller = await Controller.start(ControllerConfig(port=port))
        state = await controller.watcher.wait_for_state(
            worker.address, {WorkerState.SERVING}, WAIT_S
        )
        assert state is WorkerState.SERVING
    finally:
        await worker.stop()
        if controller is not None:
            await controller.stop(grace=0)
