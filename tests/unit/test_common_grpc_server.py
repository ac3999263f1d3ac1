"""The shared gRPC server: health reports NOT_SERVING from the start until told otherwise."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.grpc_server import GrpcServer, create_server, insecure_channel

SERVICE = "chatfleet.v1.ExampleService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture
async def server() -> AsyncIterator[GrpcServer]:
    created = create_server("127.0.0.1", 0, [SERVICE])
    await created.start()
    try:
        yield created
    finally:
        await created.server.stop(None)


@pytest.fixture
async def health(server: GrpcServer) -> AsyncIterator[health_pb2_grpc.HealthStub]:
    async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
        yield health_pb2_grpc.HealthStub(channel)


async def status(health: health_pb2_grpc.HealthStub, service: str) -> int:
    response = await health.Check(health_pb2.HealthCheckRequest(service=service))
    return int(response.status)


async def test_started_server_is_not_serving_until_set_serving(
    server: GrpcServer, health: health_pb2_grpc.HealthStub
) -> None:
    assert await status(health, "") == NOT_SERVING
    assert await status(health, SERVICE) == NOT_SERVING

    await server.set_serving(True)
    assert await status(health, "") == SERVING
    assert await status(health, SERVICE) == SERVING

    await server.set_serving(False)
    assert await status(health, "") == NOT_SERVING
    assert await status(health, SERVICE) == NOT_SERVING


async def test_watch_starts_not_serving(
    server: GrpcServer, health: health_pb2_grpc.HealthStub
) -> None:
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    try:
        first = await watch.read()
        assert isinstance(first, health_pb2.HealthCheckResponse)
        assert first.status == NOT_SERVING
        await server.set_serving(True)
        second = await watch.read()
        assert isinstance(second, health_pb2.HealthCheckResponse)
        assert second.status == SERVING
    finally:
        watch.cancel()
