"""ControllerService over real gRPC, with bare health servers standing in for workers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from chatfleet.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from services.common.grpc_errors import field_of
from services.common.grpc_server import GrpcServer, insecure_channel
from services.controller.config import ControllerConfig
from services.controller.main import Controller
from services.controller.registry import WorkerState
from tests.unit.fakes import start_health_server

WAIT_S = 10.0

CHAT = common_pb2.ModelInfo(
    name="chat",
    kind=common_pb2.MODEL_KIND_GENERATE,
    context_length=2048,
    supports_chat=True,
    aliases=["chat-alias"],
)
EMBED = common_pb2.ModelInfo(
    name="embed", kind=common_pb2.MODEL_KIND_EMBED, supports_embeddings=True
)


@pytest.fixture
async def controller() -> AsyncIterator[Controller]:
    started = await Controller.start(ControllerConfig(port=0, heartbeat_interval=7))
    try:
        yield started
    finally:
        await started.stop(grace=0)


@pytest.fixture
async def stub(controller: Controller) -> AsyncIterator[controller_pb2_grpc.ControllerServiceStub]:
    async with insecure_channel(controller.address) as channel:
        yield controller_pb2_grpc.ControllerServiceStub(channel)


@pytest.fixture
async def fake_worker() -> AsyncIterator[GrpcServer]:
    """A worker stand-in: only a health service, SERVING."""
    server = await start_health_server()
    await server.set_serving(True)
    try:
        yield server
    finally:
        await server.server.stop(None)


def address_of(server: GrpcServer) -> str:
    return f"127.0.0.1:{server.port}"


async def register(
    stub: controller_pb2_grpc.ControllerServiceStub,
    address: str,
    models: list[common_pb2.ModelInfo],
    running: int = 0,
    capacity: int = 4,
) -> controller_pb2.RegisterWorkerResponse:
    return await stub.RegisterWorker(
        controller_pb2.RegisterWorkerRequest(
            address=address,
            models=models,
            load=common_pb2.Load(running=running, capacity=capacity),
        )
    )


async def test_controller_reports_serving_and_reflection(controller: Controller) -> None:
    async with insecure_channel(controller.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for response in reflection.ServerReflectionInfo(iter([request])):
            names = {s.name for s in response.list_services_response.service}
        assert "chatfleet.v1.ControllerService" in names


async def test_registered_worker_is_serving_when_register_returns(
    stub: controller_pb2_grpc.ControllerServiceStub, fake_worker: GrpcServer
) -> None:
    reply = await register(stub, address_of(fake_worker), [CHAT])
    assert reply.heartbeat_interval_seconds == 7
    workers = (await stub.ListWorkers(controller_pb2.ListWorkersRequest())).workers
    assert [w.address for w in workers] == [address_of(fake_worker)]
    assert workers[0].state == controller_pb2.WORKER_STATE_SERVING
    assert workers[0].models[0].name == "chat"
    assert workers[0].load.capacity == 4


async def test_heartbeat_updates_load_and_asks_unknown_workers_to_register(
    stub: controller_pb2_grpc.ControllerServiceStub, fake_worker: GrpcServer
) -> None:
    unknown = await stub.Heartbeat(controller_pb2.HeartbeatRequest(address="nobody:1"))
    assert unknown.reregister is True
    await register(stub, address_of(fake_worker), [CHAT])
    known = await stub.Heartbeat(
        controller_pb2.HeartbeatRequest(
            address=address_of(fake_worker), load=common_pb2.Load(running=3, capacity=4)
        )
    )
    assert known.reregister is False
    workers = (await stub.ListWorkers(controller_pb2.ListWorkersRequest())).workers
    assert workers[0].load.running == 3


async def test_list_models_has_serving_workers_models_with_aliases_sorted(
    controller: Controller,
    stub: controller_pb2_grpc.ControllerServiceStub,
    fake_worker: GrpcServer,
) -> None:
    draining = await start_health_server()  # NOT_SERVING
    try:
        await register(stub, address_of(fake_worker), [CHAT])
        await register(stub, address_of(draining), [EMBED])
        state = await controller.watcher.wait_for_state(
            address_of(draining), {WorkerState.NOT_SERVING}, WAIT_S
        )
        assert state is WorkerState.NOT_SERVING
        models = (await stub.ListModels(controller_pb2.ListModelsRequest())).models
        assert [m.name for m in models] == ["chat", "chat-alias"]
        assert list(models[1].aliases) == ["chat"]
        assert models[1].kind == common_pb2.MODEL_KIND_GENERATE
    finally:
        await draining.server.stop(None)


async def test_select_worker_picks_shortest_queue_and_honours_exclude(
    stub: controller_pb2_grpc.ControllerServiceStub, fake_worker: GrpcServer
) -> None:
    other = await start_health_server()
    await other.set_serving(True)
    try:
        await register(stub, address_of(fake_worker), [CHAT], running=0)
        await register(stub, address_of(other), [CHAT], running=3)
        chosen = await stub.SelectWorker(controller_pb2.SelectWorkerRequest(model="chat-alias"))
        assert chosen.address == address_of(fake_worker)
        assert chosen.model.name == "chat"
        avoided = await stub.SelectWorker(
            controller_pb2.SelectWorkerRequest(
                model="chat",
                dispatch_method=controller_pb2.DISPATCH_METHOD_SHORTEST_QUEUE,
                exclude_addresses=[address_of(fake_worker)],
            )
        )
        assert avoided.address == address_of(other)
        lottery = await stub.SelectWorker(
            controller_pb2.SelectWorkerRequest(
                model="chat", dispatch_method=controller_pb2.DISPATCH_METHOD_LOTTERY
            )
        )
        assert lottery.address in {address_of(fake_worker), address_of(other)}
    finally:
        await other.server.stop(None)


async def test_select_worker_not_found_for_unknown_model(
    stub: controller_pb2_grpc.ControllerServiceStub, fake_worker: GrpcServer
) -> None:
    await register(stub, address_of(fake_worker), [CHAT])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SelectWorker(controller_pb2.SelectWorkerRequest(model="missing"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert field_of(caught.value) == "model"


async def test_select_worker_unavailable_when_no_worker_is_serving(
    controller: Controller, stub: controller_pb2_grpc.ControllerServiceStub
) -> None:
    loading = await start_health_server()  # NOT_SERVING, as while loading models
    try:
        await register(stub, address_of(loading), [CHAT])
        assert controller.registry.state(address_of(loading)) is WorkerState.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.SelectWorker(controller_pb2.SelectWorkerRequest(model="chat"))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await loading.server.stop(None)


async def test_unreachable_address_is_registered_as_unreachable(
    controller: Controller, stub: controller_pb2_grpc.ControllerServiceStub
) -> None:
    gone = await start_health_server()
    address = address_of(gone)
    await gone.server.stop(None)  # nothing listens there any more
    await register(stub, address, [CHAT])
    assert controller.registry.state(address) is WorkerState.UNREACHABLE
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SelectWorker(controller_pb2.SelectWorkerRequest(model="chat"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_deregister_removes_the_worker(
    stub: controller_pb2_grpc.ControllerServiceStub, fake_worker: GrpcServer
) -> None:
    await register(stub, address_of(fake_worker), [CHAT])
    request = controller_pb2.DeregisterWorkerRequest(address=address_of(fake_worker))
    assert (await stub.DeregisterWorker(request)).existed is True
    assert (await stub.DeregisterWorker(request)).existed is False
    assert not (await stub.ListWorkers(controller_pb2.ListWorkersRequest())).workers
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.SelectWorker(controller_pb2.SelectWorkerRequest(model="chat"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("rpc", "request_message", "field"),
    [
        ("RegisterWorker", controller_pb2.RegisterWorkerRequest(models=[CHAT]), "address"),
        ("RegisterWorker", controller_pb2.RegisterWorkerRequest(address="w:1"), "models"),
        (
            "RegisterWorker",
            controller_pb2.RegisterWorkerRequest(
                address="w:1", models=[common_pb2.ModelInfo(kind=common_pb2.MODEL_KIND_EMBED)]
            ),
            "models.name",
        ),
        ("DeregisterWorker", controller_pb2.DeregisterWorkerRequest(), "address"),
        ("Heartbeat", controller_pb2.HeartbeatRequest(), "address"),
        ("SelectWorker", controller_pb2.SelectWorkerRequest(), "model"),
        ("SelectWorker", controller_pb2.SelectWorkerRequest(model="  "), "model"),
    ],
)
async def test_invalid_requests_name_the_field(
    stub: controller_pb2_grpc.ControllerServiceStub,
    rpc: str,
    request_message: object,
    field: str,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(stub, rpc)(request_message)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(caught.value) == field


async def next_fleet(
    fleet: AsyncIterator[controller_pb2.WatchWorkersResponse],
    done: Callable[[controller_pb2.WatchWorkersResponse], bool],
) -> controller_pb2.WatchWorkersResponse:
    """The first message of a WatchWorkers stream for which `done` holds (changes may be folded
    into one message, so the steps before it need not each be seen)."""

    async def first() -> controller_pb2.WatchWorkersResponse:
        async for reply in fleet:
            if done(reply):
                return reply
        raise AssertionError("the WatchWorkers stream ended")

    return await asyncio.wait_for(first(), WAIT_S)


def states(reply: controller_pb2.WatchWorkersResponse) -> dict[str, int]:
    return {worker.address: worker.state for worker in reply.workers}


async def test_watch_workers_pushes_registration_health_changes_and_removal(
    stub: controller_pb2_grpc.ControllerServiceStub, fake_worker: GrpcServer
) -> None:
    address = address_of(fake_worker)
    call = stub.WatchWorkers(controller_pb2.WatchWorkersRequest())
    fleet = aiter(call)
    try:
        first = await asyncio.wait_for(anext(fleet), WAIT_S)
        assert not first.workers and not first.models  # the current fleet, at once

        await register(stub, address, [CHAT])
        serving = await next_fleet(
            fleet, lambda r: states(r) == {address: controller_pb2.WORKER_STATE_SERVING}
        )
        assert [m.name for m in serving.models] == ["chat", "chat-alias"]
        assert serving.workers[0].models[0].name == "chat"
        assert serving.workers[0].load.capacity == 4

        await fake_worker.set_serving(False)  # a health change, pushed by the worker
        draining = await next_fleet(
            fleet, lambda r: states(r) == {address: controller_pb2.WORKER_STATE_NOT_SERVING}
        )
        assert not draining.models  # no healthy worker serves them any more

        await fake_worker.set_serving(True)
        await next_fleet(fleet, lambda r: bool(r.models))
        await stub.DeregisterWorker(controller_pb2.DeregisterWorkerRequest(address=address))
        removed = await next_fleet(fleet, lambda r: not r.workers)
        assert not removed.models
    finally:
        call.cancel()


async def test_watch_workers_ends_when_the_controller_stops(
    controller: Controller, stub: controller_pb2_grpc.ControllerServiceStub
) -> None:
    call = stub.WatchWorkers(controller_pb2.WatchWorkersRequest())
    await asyncio.wait_for(call.read(), WAIT_S)
    # A grace long enough that a stream left open would end CANCELLED, not OK, when it runs out.
    await asyncio.wait_for(controller.stop(grace=WAIT_S), WAIT_S)
    assert await call.read() is grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
