"""The launcher's readiness waits against a real in-process controller: the models being listed,
and the fleet followed across a controller restart, both from the WatchWorkers stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from chatfleet.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from services.cli.launcher import wait_models_listed, watch_fleet
from services.common.grpc_server import GrpcServer, insecure_channel
from services.common.security import NO_SECURITY
from services.controller.config import ControllerConfig
from services.controller.main import Controller
from tests.unit.fakes import start_health_server

WAIT_S = 10.0

CHAT = common_pb2.ModelInfo(
    name="chat", kind=common_pb2.MODEL_KIND_GENERATE, supports_chat=True, aliases=["chat-alias"]
)
EMBED = common_pb2.ModelInfo(
    name="embed", kind=common_pb2.MODEL_KIND_EMBED, supports_embeddings=True
)


@pytest.fixture
async def controller() -> AsyncIterator[Controller]:
    started = await Controller.start(ControllerConfig(port=0))
    try:
        yield started
    finally:
        await started.stop(grace=0)


@pytest.fixture
async def workers() -> AsyncIterator[list[GrpcServer]]:
    """Two worker stand-ins: health services only, SERVING."""
    servers = [await start_health_server() for _ in range(2)]
    for server in servers:
        await server.set_serving(True)
    try:
        yield servers
    finally:
        for server in servers:
            await server.server.stop(None)


async def register(
    controller_address: str, worker: GrpcServer, model: common_pb2.ModelInfo
) -> None:
    async with insecure_channel(controller_address) as channel:
        await controller_pb2_grpc.ControllerServiceStub(channel).RegisterWorker(
            controller_pb2.RegisterWorkerRequest(address=f"127.0.0.1:{worker.port}", models=[model])
        )


async def listed(controller_address: str, name: str) -> None:
    """Until the controller lists `name`."""
    async with contextlib.aclosing(watch_fleet(controller_address, security=NO_SECURITY)) as fleet:
        async for reply in fleet:
            if name in {model.name for model in reply.models}:
                return


async def test_wait_models_listed_returns_once_every_model_is_listed(
    controller: Controller, workers: list[GrpcServer]
) -> None:
    waiting = asyncio.ensure_future(
        wait_models_listed(controller.address, ["chat-alias", "embed"], security=NO_SECURITY)
    )
    try:
        await register(controller.address, workers[0], CHAT)
        await asyncio.wait_for(listed(controller.address, "chat-alias"), WAIT_S)
        assert not waiting.done()  # "embed" is not listed yet
        await register(controller.address, workers[1], EMBED)
        await asyncio.wait_for(waiting, WAIT_S)
    finally:
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting


async def until_serving(
    fleet: AsyncIterator[controller_pb2.WatchWorkersResponse], worker: GrpcServer
) -> controller_pb2.WatchWorkersResponse:
    """The first fleet in which `worker` is SERVING."""
    wanted = (f"127.0.0.1:{worker.port}", controller_pb2.WORKER_STATE_SERVING)
    while True:
        reply = await asyncio.wait_for(anext(fleet), WAIT_S)
        if wanted in {(worker.address, worker.state) for worker in reply.workers}:
            return reply


async def test_watch_fleet_follows_a_controller_restart(workers: list[GrpcServer]) -> None:
    first = await Controller.start(ControllerConfig(port=0))
    second: Controller | None = None
    try:
        async with contextlib.aclosing(watch_fleet(first.address, security=NO_SECURITY)) as fleet:
            assert not (await asyncio.wait_for(anext(fleet), WAIT_S)).workers
            await register(first.address, workers[0], CHAT)
            assert len((await until_serving(fleet, workers[0])).workers) == 1
            await first.stop(grace=0)  # ends the stream
            second = await Controller.start(ControllerConfig(port=first.port))
            # The new controller's fleet: it knows no worker until they register again.
            assert not (await asyncio.wait_for(anext(fleet), WAIT_S)).workers
            await register(second.address, workers[1], EMBED)
            reply = await until_serving(fleet, workers[1])
            assert [model.name for model in reply.models] == ["embed"]
    finally:
        await first.stop(grace=0)
        if second is not None:
            await second.stop(grace=0)
