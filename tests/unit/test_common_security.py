"""The internal gRPC services' protection: the shared token, TLS and mutual TLS, end to end from the
gateway through the controller to a worker, with certificates made at test time by openssl."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from gateway_fakes import chat_body, gateway_client
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatfleet.v1 import controller_pb2, controller_pb2_grpc
from services.common.grpc_server import open_channel
from services.common.security import GrpcSecurity
from services.controller import config as controller_config
from services.controller.config import ControllerConfig
from services.controller.main import Controller
from services.controller.registry import WorkerState
from services.gateway import config as gateway_config
from services.gateway.config import GatewayConfig
from services.worker.main import Worker
from tests.unit.fakes import FakeEngine, worker_config

TOKEN = "s3cret-token"
WAIT_S = 10.0

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@dataclasses.dataclass(frozen=True)
class Certs:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # a CA that signed nothing here


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _ca(directory: Path, name: str) -> tuple[str, str]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
    )  # fmt: skip
    return str(cert), str(key)


def _leaf(directory: Path, name: str, ca: tuple[str, str]) -> tuple[str, str]:
    cert, key, csr = (directory / f"{name}.pem", directory / f"{name}.key", directory / "x.csr")
    ext = directory / f"{name}.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", str(key), "-out", str(csr),
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
        "-days", "2", "-extfile", str(ext), "-out", str(cert),
    )  # fmt: skip
    return str(cert), str(key)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    directory = tmp_path_factory.mktemp("certs")
    ca = _ca(directory, "test-ca")
    server = _leaf(directory, "server", ca)
    client = _leaf(directory, "client", ca)
    other = _ca(directory, "other-ca")
    return Certs(ca[0], server[0], server[1], client[0], client[1], other[0])


@pytest.fixture
async def token_controller() -> AsyncIterator[Controller]:
    controller = await Controller.start(
        ControllerConfig(port=0, security=GrpcSecurity(token=TOKEN))
    )
    try:
        yield controller
    finally:
        await controller.stop(grace=0)


async def _list_workers(address: str, security: GrpcSecurity) -> controller_pb2.ListWorkersResponse:
    async with open_channel(address, security) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        response: controller_pb2.ListWorkersResponse = await stub.ListWorkers(
            controller_pb2.ListWorkersRequest(), timeout=WAIT_S
        )
        return response


async def _code_of(address: str, security: GrpcSecurity) -> grpc.StatusCode:
    try:
        await _list_workers(address, security)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


async def test_token_is_required_on_every_rpc(token_controller: Controller) -> None:
    address = token_controller.address
    assert await _code_of(address, GrpcSecurity()) == grpc.StatusCode.UNAUTHENTICATED
    assert await _code_of(address, GrpcSecurity(token="wrong")) == grpc.StatusCode.UNAUTHENTICATED
    assert await _code_of(address, GrpcSecurity(token=TOKEN)) == grpc.StatusCode.OK


async def test_health_stays_open_without_the_token(token_controller: Controller) -> None:
    async with open_channel(token_controller.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=WAIT_S
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_tls_server_refuses_plaintext_and_untrusted_clients(certs: Certs) -> None:
    server = GrpcSecurity(tls_cert=certs.server_cert, tls_key=certs.server_key)
    controller = await Controller.start(ControllerConfig(port=0, security=server))
    try:
        address = f"127.0.0.1:{controller.port}"
        assert await _code_of(address, GrpcSecurity()) == grpc.StatusCode.UNAVAILABLE
        untrusting = GrpcSecurity(tls_ca=certs.other_ca)
        assert await _code_of(address, untrusting) == grpc.StatusCode.UNAVAILABLE
        assert await _code_of(address, GrpcSecurity(tls_ca=certs.ca)) == grpc.StatusCode.OK
    finally:
        await controller.stop(grace=0)


async def test_mutual_tls_requires_a_client_certificate(certs: Certs) -> None:
    server = GrpcSecurity(
        tls_cert=certs.server_cert, tls_key=certs.server_key, tls_ca=certs.ca, tls_client_auth=True
    )
    controller = await Controller.start(ControllerConfig(port=0, security=server))
    try:
        address = f"127.0.0.1:{controller.port}"
        no_cert = GrpcSecurity(tls_ca=certs.ca)
        assert await _code_of(address, no_cert) == grpc.StatusCode.UNAVAILABLE
        with_cert = GrpcSecurity(
            tls_ca=certs.ca, tls_cert=certs.client_cert, tls_key=certs.client_key
        )
        assert await _code_of(address, with_cert) == grpc.StatusCode.OK
    finally:
        await controller.stop(grace=0)


async def test_gateway_controller_and_worker_over_mutual_tls_and_token(certs: Certs) -> None:
    # One certificate per process, signed by the shared CA, used both to serve and as a client.
    def security(cert: str, key: str) -> GrpcSecurity:
        return GrpcSecurity(
            token=TOKEN, tls_cert=cert, tls_key=key, tls_ca=certs.ca, tls_client_auth=True
        )

    server_side = security(certs.server_cert, certs.server_key)
    controller = await Controller.start(ControllerConfig(port=0, security=server_side))
    controller_address = f"127.0.0.1:{controller.port}"
    config = dataclasses.replace(worker_config(controller_address), security=server_side)
    worker = await Worker.start(config, engines=[FakeEngine("tiny-chat")])
    try:
        # Registration (worker -> controller) and the health watch (controller -> worker) both
        # went through: the worker is SERVING in the registry.
        state = await controller.watcher.wait_for_state(
            worker.address, {WorkerState.SERVING}, WAIT_S
        )
        assert state is WorkerState.SERVING

        gateway = GatewayConfig(
            controller_address=controller_address,
            security=security(certs.client_cert, certs.client_key),
        )
        async with gateway_client(gateway) as client:
            response = await client.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "Hello, world"

        # A gateway without the token is refused: a deployment mistake (500), not the client's
        # API key (401).
        tokenless = dataclasses.replace(
            gateway, security=dataclasses.replace(gateway.security, token=None)
        )
        async with gateway_client(tokenless) as client:
            response = await client.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 500, response.text
        assert "--grpc-token" in response.json()["error"]["message"]
    finally:
        await worker.stop()
        await controller.stop(grace=0)


def _parse(module: object, argv: list[str], environ: dict[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser, environ)  # type: ignore[attr-defined]
    return parser.parse_args(argv)


def test_security_flags_fall_back_to_the_environment(certs: Certs) -> None:
    environ = {"CHATFLEET_GRPC_TOKEN": TOKEN, "CHATFLEET_TLS_CA": certs.ca}
    ns = _parse(controller_config, [], environ)
    assert ControllerConfig.from_namespace(ns).security == GrpcSecurity(
        token=TOKEN, tls_ca=certs.ca
    )
    ns = _parse(gateway_config, ["--grpc-token", "other"], environ)
    assert GatewayConfig.from_namespace(ns).security.token == "other"


def test_security_settings_are_validated(certs: Certs) -> None:
    with pytest.raises(ValueError, match="--tls-key"):
        GrpcSecurity(tls_cert=certs.server_cert)
    with pytest.raises(ValueError, match="--tls-client-auth"):
        GrpcSecurity(tls_cert=certs.server_cert, tls_key=certs.server_key, tls_client_auth=True)
    with pytest.raises(ValueError, match="no such file"):
        GrpcSecurity(tls_ca="/nonexistent/ca.pem")
    with pytest.raises(ValueError, match="--grpc-token"):
        GrpcSecurity(token=" padded ")
    assert TOKEN not in repr(GrpcSecurity(token=TOKEN))
