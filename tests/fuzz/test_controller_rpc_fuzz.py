"""Hypothesis-generated requests to every ControllerService RPC of a real controller, with one
healthy stand-in worker registered: each answers OK or the right error status, never INTERNAL or
UNKNOWN, never hangs, and the controller stays healthy and keeps routing to that worker."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatfleet.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from services.common.grpc_server import GrpcServer, insecure_channel
from services.controller.config import ControllerConfig
from services.controller.main import Controller
from tests.fuzz.proto_strategies import messages, mostly
from tests.unit.fakes import start_health_server

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "fuzz-model"
CALL_TIMEOUT_S = 30.0
INVALID = grpc.StatusCode.INVALID_ARGUMENT

FUZZ = settings(
    max_examples=60,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _closed_port() -> int:
    """A loopback port nobody listens on: registering it makes a worker that is unreachable at
    once (connection refused), not one that keeps RegisterWorker waiting for a first report."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_DEAD = _closed_port()
_ADDRESS = mostly(
    st.sampled_from([f"127.0.0.1:{_DEAD}", f"localhost:{_DEAD}", f"[::1]:{_DEAD}"]),
    st.one_of(st.sampled_from(["", " ", ":", f":{_DEAD}"]), st.text(max_size=12)),
)
_NAME = mostly(st.sampled_from([MODEL, "other-model"]), st.text(max_size=8))
_V1 = "chatfleet.v1."
OVERRIDES = {
    f"{_V1}RegisterWorkerRequest.address": _ADDRESS,
    f"{_V1}DeregisterWorkerRequest.address": _ADDRESS,
    f"{_V1}HeartbeatRequest.address": _ADDRESS,
    f"{_V1}SelectWorkerRequest.model": _NAME,
    f"{_V1}SelectWorkerRequest.exclude_addresses": _ADDRESS,
    f"{_V1}SelectWorkerRequest.dispatch_method": mostly(
        st.sampled_from(controller_pb2.DispatchMethod.values()), st.integers(-(2**31), 2**31 - 1)
    ),
    f"{_V1}ModelInfo.name": _NAME,
    f"{_V1}ModelInfo.aliases": _NAME,
    f"{_V1}ModelInfo.kind": mostly(
        st.sampled_from([common_pb2.MODEL_KIND_GENERATE, common_pb2.MODEL_KIND_EMBED]),
        st.integers(-(2**31), 2**31 - 1),
    ),
}


class Fleet:
    def __init__(self, controller: Controller, worker: GrpcServer, channel: grpc.aio.Channel):
        self.controller = controller
        self.worker_address = f"127.0.0.1:{worker.port}"
        self.channel = channel
        self.stub = controller_pb2_grpc.ControllerServiceStub(channel)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet() -> AsyncIterator[Fleet]:
    controller = await Controller.start(ControllerConfig(port=0, heartbeat_interval=7))
    worker = await start_health_server()
    try:
        await worker.set_serving(True)
        async with insecure_channel(controller.address) as channel:
            running = Fleet(controller, worker, channel)
            await running.stub.RegisterWorker(
                controller_pb2.RegisterWorkerRequest(
                    address=running.worker_address,
                    models=[common_pb2.ModelInfo(name=MODEL, kind=common_pb2.MODEL_KIND_GENERATE)],
                    load=common_pb2.Load(capacity=4),
                )
            )
            yield running
    finally:
        await worker.server.stop(None)
        await controller.stop(grace=0)


async def status_of(call: grpc.aio.UnaryUnaryCall) -> grpc.StatusCode:  # type: ignore[type-arg]
    try:
        await call
    except grpc.aio.AioRpcError as error:
        assert error.details(), "an error says what is wrong"
        return error.code()
    return grpc.StatusCode.OK


def _expect(code: grpc.StatusCode, allowed: set[grpc.StatusCode], request: object) -> None:
    assert code in allowed, f"{code} for {request}"


@FUZZ
@given(request=messages(controller_pb2.RegisterWorkerRequest.DESCRIPTOR, OVERRIDES))
async def test_register_worker(fleet: Fleet, request: controller_pb2.RegisterWorkerRequest) -> None:
    code = await status_of(fleet.stub.RegisterWorker(request, timeout=CALL_TIMEOUT_S))
    _expect(code, {grpc.StatusCode.OK, INVALID}, request)
    if code == grpc.StatusCode.OK and request.address.strip() != fleet.worker_address:
        # Keep the registry (and the health watches) small; deregistration is fuzzed below.
        await fleet.stub.DeregisterWorker(
            controller_pb2.DeregisterWorkerRequest(address=request.address)
        )


@FUZZ
@given(
    deregister=messages(controller_pb2.DeregisterWorkerRequest.DESCRIPTOR, OVERRIDES),
    heartbeat=messages(controller_pb2.HeartbeatRequest.DESCRIPTOR, OVERRIDES),
)
async def test_deregister_and_heartbeat(
    fleet: Fleet,
    deregister: controller_pb2.DeregisterWorkerRequest,
    heartbeat: controller_pb2.HeartbeatRequest,
) -> None:
    if deregister.address.strip() == fleet.worker_address:
        deregister.address = ""  # the stand-in worker stays registered for SelectWorker
    code = await status_of(fleet.stub.DeregisterWorker(deregister, timeout=CALL_TIMEOUT_S))
    _expect(code, {grpc.StatusCode.OK, INVALID}, deregister)
    code = await status_of(fleet.stub.Heartbeat(heartbeat, timeout=CALL_TIMEOUT_S))
    _expect(code, {grpc.StatusCode.OK, INVALID}, heartbeat)


@FUZZ
@given(
    select=messages(controller_pb2.SelectWorkerRequest.DESCRIPTOR, OVERRIDES),
    list_models=messages(controller_pb2.ListModelsRequest.DESCRIPTOR, OVERRIDES),
    list_workers=messages(controller_pb2.ListWorkersRequest.DESCRIPTOR, OVERRIDES),
)
async def test_select_and_list(
    fleet: Fleet,
    select: controller_pb2.SelectWorkerRequest,
    list_models: controller_pb2.ListModelsRequest,
    list_workers: controller_pb2.ListWorkersRequest,
) -> None:
    code = await status_of(fleet.stub.SelectWorker(select, timeout=CALL_TIMEOUT_S))
    # UNAVAILABLE: the model's workers exist but none is SERVING (a fuzzed dead one).
    allowed = {grpc.StatusCode.OK, INVALID, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE}
    _expect(code, allowed, select)
    if select.model == MODEL and select.dispatch_method in controller_pb2.DispatchMethod.values():
        assert code == grpc.StatusCode.OK
    assert await status_of(fleet.stub.ListModels(list_models, timeout=CALL_TIMEOUT_S)) == (
        grpc.StatusCode.OK
    )
    assert await status_of(fleet.stub.ListWorkers(list_workers, timeout=CALL_TIMEOUT_S)) == (
        grpc.StatusCode.OK
    )


async def test_the_controller_survived_and_still_routes(fleet: Fleet) -> None:
    health = await health_pb2_grpc.HealthStub(fleet.channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    chosen = await fleet.stub.SelectWorker(controller_pb2.SelectWorkerRequest(model=MODEL))
    assert chosen.address == fleet.worker_address
