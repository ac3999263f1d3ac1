"""A real worker (FakeEngines) and a real controller: registration, liveness from health Watch
streams, and recovery when the controller restarts."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import signal
import sys
from collections.abc import AsyncIterator

import grpc
import pytest

from chatfleet.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from services.cli.launcher import free_port
from services.common.grpc_server import insecure_channel
from services.controller.config import ControllerConfig, add_arguments
from services.controller.main import Controller
from services.controller.registry import WorkerState
from services.worker.main import Worker
from tests.unit.fakes import FakeEngine, worker_config

WAIT_S = 10.0

# A stand-in worker process: a health server on a free port that prints its port.
_HEALTH_SERVER_PROCESS = """
import asyncio
from services.common.grpc_server import create_server

async def main():
    server = create_server("127.0.0.1", 0, [])
    await server.start()
    await server.set_serving(True)
    print(server.port, flush=True)
    await server.server.wait_for_termination()

asyncio.run(main())
"""


@pytest.fixture
async def controller() -> AsyncIterator[Controller]:
    started = await Controller.start(ControllerConfig(port=0))
    try:
        yield started
    finally:
        await started.stop(grace=0)


@pytest.fixture
async def stub(controller: Controller) -> AsyncIterator[controller_pb2_grpc.ControllerServiceStub]:
    async with insecure_channel(controller.address) as channel:
        yield controller_pb2_grpc.ControllerServiceStub(channel)


@pytest.fixture
async def worker(controller: Controller) -> AsyncIterator[Worker]:
    engines = [
        FakeEngine("fake-chat", aliases=("fc",)),
        FakeEngine("fake-embed", generates=False),
    ]
    started = await Worker.start(
        worker_config(controller.address, heartbeat_interval=0.1), engines=engines
    )
    try:
        yield started
    finally:
        await started.stop()


async def select(stub: controller_pb2_grpc.ControllerServiceStub, model: str) -> str:
    reply = await stub.SelectWorker(controller_pb2.SelectWorkerRequest(model=model))
    return reply.address


async def select_error(
    stub: controller_pb2_grpc.ControllerServiceStub, model: str
) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await select(stub, model)
    return caught.value.code()


async def test_started_worker_is_registered_and_selectable(
    stub: controller_pb2_grpc.ControllerServiceStub, worker: Worker
) -> None:
    workers = (await stub.ListWorkers(controller_pb2.ListWorkersRequest())).workers
    assert [w.address for w in workers] == [worker.address]
    assert workers[0].state == controller_pb2.WORKER_STATE_SERVING
    assert [(m.name, m.kind) for m in workers[0].models] == [
        ("fake-chat", common_pb2.MODEL_KIND_GENERATE),
        ("fake-embed", common_pb2.MODEL_KIND_EMBED),
    ]
    assert workers[0].load.capacity == 8
    assert await select(stub, "fc") == worker.address
    models = (await stub.ListModels(controller_pb2.ListModelsRequest())).models
    assert [m.name for m in models] == ["fake-chat", "fake-embed", "fc"]


async def test_worker_health_flips_the_controllers_view(
    controller: Controller, stub: controller_pb2_grpc.ControllerServiceStub, worker: Worker
) -> None:
    await worker.grpc.set_serving(False)
    state = await controller.watcher.wait_for_state(
        worker.address, {WorkerState.NOT_SERVING}, WAIT_S
    )
    assert state is WorkerState.NOT_SERVING
    assert await select_error(stub, "fake-chat") == grpc.StatusCode.UNAVAILABLE
    assert not (await stub.ListModels(controller_pb2.ListModelsRequest())).models

    await worker.grpc.set_serving(True)
    state = await controller.watcher.wait_for_state(worker.address, {WorkerState.SERVING}, WAIT_S)
    assert state is WorkerState.SERVING
    assert await select(stub, "fake-chat") == worker.address


async def test_stopped_worker_server_is_unreachable(
    controller: Controller, stub: controller_pb2_grpc.ControllerServiceStub, worker: Worker
) -> None:
    # A crash: the server goes away without deregistering.
    assert worker.link is not None
    await worker.link.stop(deregister=False)
    await worker.grpc.server.stop(None)
    state = await controller.watcher.wait_for_state(
        worker.address, {WorkerState.UNREACHABLE}, WAIT_S
    )
    assert state is WorkerState.UNREACHABLE
    assert await select_error(stub, "fake-chat") == grpc.StatusCode.UNAVAILABLE


async def test_worker_back_from_a_crash_is_serving_once_registered(
    controller: Controller, worker: Worker
) -> None:
    assert worker.link is not None
    await worker.link.stop(deregister=False)
    await worker.grpc.server.stop(None)
    state = await controller.watcher.wait_for_state(
        worker.address, {WorkerState.UNREACHABLE}, WAIT_S
    )
    assert state is WorkerState.UNREACHABLE
    config = dataclasses.replace(worker_config(controller.address), port=worker.port)
    restarted = await Worker.start(config, engines=[FakeEngine("fake-chat")])
    try:
        # RegisterWorker returns once the new process's health is known, not stale UNREACHABLE.
        assert controller.registry.state(worker.address) is WorkerState.SERVING
    finally:
        await restarted.stop()


async def test_killed_worker_process_is_unreachable(
    controller: Controller, stub: controller_pb2_grpc.ControllerServiceStub
) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HEALTH_SERVER_PROCESS, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        port = int(await asyncio.wait_for(process.stdout.readline(), WAIT_S))
        address = f"127.0.0.1:{port}"
        await stub.RegisterWorker(
            controller_pb2.RegisterWorkerRequest(
                address=address,
                models=[common_pb2.ModelInfo(name="m", kind=common_pb2.MODEL_KIND_GENERATE)],
            )
        )
        assert controller.registry.state(address) is WorkerState.SERVING
        process.send_signal(signal.SIGKILL)
        state = await controller.watcher.wait_for_state(address, {WorkerState.UNREACHABLE}, WAIT_S)
        assert state is WorkerState.UNREACHABLE
        assert await select_error(stub, "m") == grpc.StatusCode.UNAVAILABLE
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


async def test_graceful_worker_stop_deregisters(
    controller: Controller, stub: controller_pb2_grpc.ControllerServiceStub, worker: Worker
) -> None:
    await worker.stop()
    assert worker.address not in controller.registry
    assert await select_error(stub, "fake-chat") == grpc.StatusCode.NOT_FOUND


async def test_worker_registers_again_with_a_restarted_controller(
    controller: Controller, worker: Worker
) -> None:
    port = controller.port
    await controller.stop(grace=0)
    restarted = await Controller.start(ControllerConfig(port=port))
    try:
        state = await restarted.watcher.wait_for_state(
            worker.address, {WorkerState.SERVING}, WAIT_S
        )
        assert state is WorkerState.SERVING
        record = restarted.registry.get(worker.address)
        assert record is not None
        assert [m.name for m in record.models] == ["fake-chat", "fake-embed"]
    finally:
        await restarted.stop(grace=0)


async def test_worker_unreachable_past_forget_after_is_dropped_until_it_registers_again() -> None:
    controller = await Controller.start(ControllerConfig(port=0, forget_after=0.5))
    try:
        address = f"127.0.0.1:{free_port()}"  # nothing listens there: UNREACHABLE at once
        chat = common_pb2.ModelInfo(name="m", kind=common_pb2.MODEL_KIND_GENERATE)
        async with insecure_channel(controller.address) as channel:
            stub = controller_pb2_grpc.ControllerServiceStub(channel)
            await stub.RegisterWorker(
                controller_pb2.RegisterWorkerRequest(address=address, models=[chat])
            )
            assert address in controller.registry
            state = await controller.watcher.wait_for_state(address, {None}, WAIT_S)
            assert state is None
            assert address not in controller.registry
            assert await select_error(stub, "m") == grpc.StatusCode.NOT_FOUND
            # Back again: registering brings it back under watch like any new worker.
            await stub.RegisterWorker(
                controller_pb2.RegisterWorkerRequest(address=address, models=[chat])
            )
            assert address in controller.registry
    finally:
        await controller.stop(grace=0)


def test_forget_after_flag_and_validation() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, {"CHATFLEET_CONTROLLER_FORGET_AFTER": "60"})
    assert ControllerConfig.from_namespace(parser.parse_args([])).forget_after == 60.0
    ns = parser.parse_args(["--forget-after", "0"])
    assert ControllerConfig.from_namespace(ns).forget_after == 0.0
    with pytest.raises(ValueError, match="--forget-after"):
        ControllerConfig(forget_after=-1)
