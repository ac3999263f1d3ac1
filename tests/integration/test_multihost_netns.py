"""Multi-host on one machine: the controller, two workers and the gateway each run in a network
namespace of their own (a "host" with its own address, plugged into a bridge in a "switch"
namespace), then one worker host is unplugged and the traffic moves to the other.

Needs root and iproute2; skipped, with the reason, where network namespaces cannot be made.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from chatfleet.v1 import controller_pb2, controller_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.cli.launcher import ServiceProcess, wait_models_listed, watch_fleet
from services.common.grpc_server import insecure_channel
from services.worker.default_models import DEFAULT_CHAT_MODEL_NAME, default_chat_model_path

# Two workers load the model at once on a shared machine: more than the suite's 300 s default.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

READY_TIMEOUT_S = 300.0
# The controller notices a silent host through channel keepalive (10 s ping + 5 s timeout); this
# leaves room for a loaded machine.
DETECT_TIMEOUT_S = 90.0
REQUEST_TIMEOUT_S = 180.0
CONTROLLER_PORT, WORKER_PORT, GATEWAY_PORT = 21001, 21002, 8000  # every host has its own ports
QUESTION = "What is the capital of France?"


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def _must(*args: str) -> None:
    result = _ip(*args)
    if result.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")


def _netns_unavailable() -> str | None:
    """Why this process cannot build the test network, found by trying; None when it can."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` command is not installed (apt-get install iproute2)"
    probe = f"cf{secrets.token_hex(2)}-probe"
    steps = [
        ("netns", "add", probe),
        ("link", "add", f"{probe[:6]}p", "type", "veth", "peer", "name", "eth0", "netns", probe),
        ("netns", "exec", probe, "ip", "link", "set", "lo", "up"),
    ]
    try:
        for step in steps:
            result = _ip(*step)
            if result.returncode != 0:
                return (
                    f"cannot create network namespaces: `ip {' '.join(step)}` failed: "
                    f"{result.stderr.strip() or result.returncode}"
                )
        return None
    finally:
        _ip("link", "del", f"{probe[:6]}p")
        _ip("netns", "del", probe)


@dataclass
class Host:
    role: str
    netns: str
    ip: str


@dataclass
class Network:
    """A bridge in a "switch" namespace, the test's own (root) namespace plugged into it by an
    uplink, and one namespace per host plugged into port `p-<role>`."""

    tag: str
    subnet: str  # the first three octets
    hosts: dict[str, Host] = field(default_factory=dict)

    @property
    def switch(self) -> str:
        return f"cf{self.tag}-sw"

    @property
    def uplink(self) -> str:
        return f"cf{self.tag}"

    @classmethod
    def create(cls, roles: list[str]) -> Network:
        taken = _ip("-4", "addr").stdout
        third = next(n for n in range(200, 256) if f"10.231.{n}." not in taken)
        network = cls(tag=secrets.token_hex(2), subnet=f"10.231.{third}")
        try:
            network._build(roles)
        except BaseException:
            network.destroy()
            raise
        return network

    def _build(self, roles: list[str]) -> None:
        _must("netns", "add", self.switch)
        _must("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _must("-n", self.switch, "link", "set", "br0", "up")
        _must(
            "link", "add", self.uplink, "type", "veth", "peer", "name", "up0", "netns", self.switch
        )
        _must("-n", self.switch, "link", "set", "up0", "master", "br0", "up")
        _must("addr", "add", f"{self.subnet}.1/24", "dev", self.uplink)
        _must("link", "set", self.uplink, "up")
        for index, role in enumerate(roles, start=10):
            host = Host(role=role, netns=f"cf{self.tag}-{role}", ip=f"{self.subnet}.{index}")
            self.hosts[role] = host
            _must("netns", "add", host.netns)
            port = f"p-{role}"
            _must("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                  "netns", host.netns)  # fmt: skip
            _must("-n", self.switch, "link", "set", port, "master", "br0", "up")
            _must("-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            _must("-n", host.netns, "link", "set", "eth0", "up")
            _must("-n", host.netns, "link", "set", "lo", "up")

    def unplug(self, role: str) -> None:
        """Pull the host's cable at the switch: its packets vanish, nobody gets a reset."""
        _must("-n", self.switch, "link", "set", f"p-{role}", "down")

    def plug(self, role: str) -> None:
        _must("-n", self.switch, "link", "set", f"p-{role}", "up")

    def destroy(self) -> None:
        """Delete every namespace (their veths go with them) and the uplink; never raises."""
        for host in self.hosts.values():
            _ip("netns", "del", host.netns)
        _ip("link", "del", self.uplink)
        _ip("netns", "del", self.switch)


@dataclass
class NetnsServiceProcess(ServiceProcess):
    """A `chatfleet <service>` process started inside a network namespace (`ip netns exec` execs
    the command, so the pid is the service's own and signals reach it directly)."""

    netns: str = ""

    def start(self) -> None:
        stdout = open(self.log_path, "ab") if self.log_path else None
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, sys.executable, "-m", "services.cli.main",
             self.name, *self.args],
            env=dict(os.environ if self.env is None else self.env),
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout else None,
        )  # fmt: skip
        if stdout:
            stdout.close()


@dataclass
class Cluster:
    network: Network
    processes: dict[str, NetnsServiceProcess]
    log_dir: Path

    def address(self, role: str, port: int) -> str:
        return f"{self.network.hosts[role].ip}:{port}"

    @property
    def controller(self) -> str:
        return self.address("controller", CONTROLLER_PORT)

    @property
    def workers(self) -> list[str]:
        return [self.address(role, WORKER_PORT) for role in ("worker1", "worker2")]

    @property
    def gateway_url(self) -> str:
        return f"http://{self.address('gateway', GATEWAY_PORT)}"

    async def start(self) -> None:
        controller = self.processes["controller"]
        controller.start()
        await controller.wait_grpc_serving(self.controller, READY_TIMEOUT_S)
        for role in ("worker1", "worker2"):
            self.processes[role].start()
        for role, address in zip(("worker1", "worker2"), self.workers, strict=True):
            await self.processes[role].wait_grpc_serving(address, READY_TIMEOUT_S)
        gateway = self.processes["gateway"]
        gateway.start()
        await gateway.wait_http_ok(f"{self.gateway_url}/health", READY_TIMEOUT_S)
        await asyncio.wait_for(
            wait_models_listed(self.controller, [DEFAULT_CHAT_MODEL_NAME]), READY_TIMEOUT_S
        )

    async def stop(self) -> None:
        for role in ("gateway", "worker1", "worker2", "controller"):
            await self.processes[role].stop(timeout=30)

    def dump_logs(self) -> None:
        for path in sorted(self.log_dir.glob("*.log")):
            print(f"==== {path.name}\n{path.read_text()[-4000:]}")


def _service_env() -> dict[str, str]:
    # No CHATFLEET_* settings leak in from the caller's environment.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATFLEET_")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return env


def _make_cluster(network: Network, log_dir: Path) -> Cluster:
    env = _service_env()
    ips = {role: host.ip for role, host in network.hosts.items()}
    controller_address = f"{ips['controller']}:{CONTROLLER_PORT}"

    def process(role: str, service: str, args: list[str]) -> NetnsServiceProcess:
        return NetnsServiceProcess(
            service, args, env, str(log_dir / f"{role}.log"), netns=network.hosts[role].netns
        )

    processes = {
        "controller": process(
            "controller", "controller", ["--host", "0.0.0.0", "--port", str(CONTROLLER_PORT)]
        ),
        "gateway": process("gateway", "gateway", [
            "--host", "0.0.0.0", "--port", str(GATEWAY_PORT),
            "--controller-address", controller_address,
        ]),
    }  # fmt: skip
    for role in ("worker1", "worker2"):
        processes[role] = process(role, "worker", [
            "--host", "0.0.0.0", "--port", str(WORKER_PORT),
            # What Kubernetes' downward API gives a pod: the address its peers reach it at.
            "--worker-address", f"{ips[role]}:{WORKER_PORT}",
            "--controller-address", controller_address,
            # The chat model only, one engine thread: two workers share the machine.
            "--model-path", str(default_chat_model_path()),
            "--model-names", DEFAULT_CHAT_MODEL_NAME,
            "--device", "cpu", "--threads", "1",
        ])  # fmt: skip
    return Cluster(network=network, processes=processes, log_dir=log_dir)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(reason)
    network = Network.create(["controller", "worker1", "worker2", "gateway"])
    try:
        running = _make_cluster(network, tmp_path_factory.mktemp("netns-logs"))
        try:
            asyncio.run(running.start())
            yield running
        except BaseException:
            running.dump_logs()
            raise
        finally:
            asyncio.run(running.stop())
    finally:
        network.destroy()


# --- helpers --------------------------------------------------------------------------------------


async def _worker_states(controller: str) -> dict[str, int]:
    async with insecure_channel(controller) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        reply = await stub.ListWorkers(controller_pb2.ListWorkersRequest(), timeout=10)
    return {worker.address: worker.state for worker in reply.workers}


async def _wait_state(controller: str, address: str, state: int) -> None:
    """Until the controller reports `address` in `state`, as its WatchWorkers stream pushes it."""

    async def reached() -> None:
        async with contextlib.aclosing(watch_fleet(controller)) as fleet:
            async for reply in fleet:
                if {worker.address: worker.state for worker in reply.workers}.get(address) == state:
                    return

    await asyncio.wait_for(reached(), DETECT_TIMEOUT_S)


async def _select(controller: str, exclude: list[str]) -> str:
    async with insecure_channel(controller) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        request = controller_pb2.SelectWorkerRequest(
            model=DEFAULT_CHAT_MODEL_NAME, exclude_addresses=exclude
        )
        reply = await stub.SelectWorker(request, timeout=10)
    return str(reply.address)


async def _running(worker: str) -> int:
    async with insecure_channel(worker) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        reply = await stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=10)
    return int(reply.load.running + reply.load.waiting)


async def _ask(client: httpx.AsyncClient) -> str:
    response = await client.post(
        "/v1/chat/completions",
        json={
            "model": DEFAULT_CHAT_MODEL_NAME,
            "messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0,
            "max_tokens": 24,
        },
    )
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


async def _first_token(lines: AsyncIterator[str]) -> str:
    """Read server-sent events until one carries generated text: the request is then running.
    The caller keeps `lines`: a line iterator that is let go of closes the response, and the
    gateway then cancels the request."""
    async for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line.removeprefix("data: "))["choices"]:
                if choice["delta"].get("content"):
                    return str(choice["delta"]["content"])
    raise AssertionError("the stream ended without text")


# --- the test -------------------------------------------------------------------------------------


async def test_unplugged_worker_host_loses_its_traffic_to_the_other(cluster: Cluster) -> None:
    worker1, worker2 = cluster.workers
    serving = controller_pb2.WORKER_STATE_SERVING
    async with httpx.AsyncClient(
        base_url=cluster.gateway_url, timeout=REQUEST_TIMEOUT_S, trust_env=False
    ) as client:
        # Before: both hosts registered under their own addresses, both selectable.
        assert await _worker_states(cluster.controller) == {worker1: serving, worker2: serving}
        assert await _select(cluster.controller, exclude=[worker2]) == worker1
        assert await _select(cluster.controller, exclude=[worker1]) == worker2
        assert "Paris" in await _ask(client)

        cluster.network.unplug("worker1")
        # At once, before anyone has noticed: requests still succeed, the gateway retrying on
        # the other worker when the chosen one turns out to be unreachable.
        answers = await asyncio.gather(*(_ask(client) for _ in range(3)))
        assert all("Paris" in answer for answer in answers)

        await _wait_state(cluster.controller, worker1, controller_pb2.WORKER_STATE_UNREACHABLE)
        assert (await _worker_states(cluster.controller))[worker2] == serving
        # The cut worker is never chosen, even when the caller would rather avoid the other.
        for _ in range(10):
            assert await _select(cluster.controller, exclude=[worker2]) == worker2
        # ... and the traffic runs on worker2: a stream in flight through the gateway shows in
        # worker2's own load.
        body = {
            "model": DEFAULT_CHAT_MODEL_NAME,
            "messages": [{"role": "user", "content": "Count from one to one thousand."}],
            "max_tokens": 1000,
            "ignore_eos": True,
            "stream": True,
        }
        async with client.stream("POST", "/v1/chat/completions", json=body) as stream:
            assert stream.status_code == 200
            lines = stream.aiter_lines()
            assert await _first_token(lines)
            assert await _running(worker2) >= 1
        assert "Paris" in await _ask(client)

        # Plugged back in, the host re-registers and is chosen again.
        cluster.network.plug("worker1")
        await _wait_state(cluster.controller, worker1, serving)
        assert await _select(cluster.controller, exclude=[worker2]) == worker1
        assert "Paris" in await _ask(client)
