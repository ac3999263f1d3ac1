"""Security across real processes: the internal RPCs need the gRPC token (health excepted), the CLI
sends it from the environment, and the gateway needs an API key on every route but /health."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatfleet.v1 import controller_pb2, controller_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.grpc_server import open_channel
from tests.chaos.fleet import CHAT_MODEL, Fleet, service_env

pytestmark = pytest.mark.integration


async def _code(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_internal_rpcs_need_the_token_but_health_does_not(fleet: Fleet) -> None:
    async with open_channel(fleet.controller_address) as channel:
        controller = controller_pb2_grpc.ControllerServiceStub(channel)
        listed = controller.ListWorkers(controller_pb2.ListWorkersRequest(), timeout=10)
        assert await _code(listed) == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        assert await _code(health) == grpc.StatusCode.OK
    async with open_channel(fleet.worker_addresses[0]) as channel:
        worker = worker_pb2_grpc.WorkerServiceStub(channel)
        load = worker.GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
        assert await _code(load) == grpc.StatusCode.UNAUTHENTICATED
    async with open_channel(fleet.worker_addresses[0], fleet.security) as channel:
        worker = worker_pb2_grpc.WorkerServiceStub(channel)
        load = worker.GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
        assert await _code(load) == grpc.StatusCode.OK


def _test_message(fleet: Fleet, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable, "-m", "services.cli.main", "test-message",
            "--controller-address", fleet.controller_address, "--model-name", CHAT_MODEL,
            "--message", "What is the capital of France?", "--max-new-tokens", "16",
        ],
        capture_output=True, text=True, timeout=180, env=env, check=False,
    )  # fmt: skip


async def test_cli_sends_the_token_from_the_environment(fleet: Fleet) -> None:
    done = await asyncio.to_thread(_test_message, fleet, service_env())
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    tokenless = {k: v for k, v in service_env().items() if k != "CHATFLEET_GRPC_TOKEN"}
    refused = await asyncio.to_thread(_test_message, fleet, tokenless)
    assert refused.returncode == 1
    assert "UNAUTHENTICATED" in refused.stderr


async def test_api_key_required_everywhere_but_health(fleet: Fleet) -> None:
    async with httpx.AsyncClient(base_url=fleet.gateway_url, timeout=30) as anonymous:
        assert (await anonymous.get("/health")).status_code == 200
        for path in ("/v1/models", f"/v1/models/{CHAT_MODEL}", "/openapi.json"):
            assert (await anonymous.get(path)).status_code == 401, path
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            assert (await anonymous.post(path, json={})).status_code == 401, path
        wrong = {"Authorization": "Bearer sk-not-the-key"}
        assert (await anonymous.get("/v1/models", headers=wrong)).status_code == 401
        assert (await anonymous.get("/v1/models", headers=fleet.headers)).status_code == 200
