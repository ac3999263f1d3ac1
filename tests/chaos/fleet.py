"""A controller, several chat-only workers and a gateway as real processes on free loopback ports,
with the handles fault injection needs: kill or stop a worker and start it again, restart the
controller, read each worker's load. Used by the chaos suite and by `make soak` (bench/soak.py).

The internal services share a gRPC token and the gateway requires an API key, so every chaos run
also exercises the security settings across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from chatfleet.v1 import controller_pb2, controller_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.cli.launcher import ServiceProcess, free_port, wait_http_ok, watch_fleet
from services.common.backoff import Backoff
from services.common.grpc_server import open_channel
from services.common.security import GrpcSecurity
from services.worker.default_models import DEFAULT_CHAT_MODEL_NAME, default_chat_model_path

HOST = "127.0.0.1"
CHAT_MODEL = DEFAULT_CHAT_MODEL_NAME
READY_TIMEOUT_S = 300.0
GRPC_TOKEN = "chaos-grpc-token"
API_KEY = "sk-chaos-api-key"

# One engine thread per worker: two workers share the machine's cores with the gateway.
DEFAULT_WORKER_FLAGS = (
    "--device", "cpu", "--threads", "1",
    "--max-batch-size", "8", "--max-queue", "2",
    "--heartbeat-interval", "1", "--shutdown-grace", "60",
)  # fmt: skip
# Patient worker selection: a controller restart on a loaded machine may take a few seconds.
DEFAULT_GATEWAY_FLAGS = ("--select-timeout", "60", "--worker-retries", "2")


def service_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            # Every service (and the launcher's readiness checks) takes the token from here.
            "CHATFLEET_GRPC_TOKEN": GRPC_TOKEN,
        }
    )
    return env


@dataclass
class WorkerLoad:
    running: int
    waiting: int


@dataclass
class Fleet:
    log_dir: Path
    controller_port: int
    worker_ports: list[int]
    gateway_port: int
    worker_flags: Sequence[str] = DEFAULT_WORKER_FLAGS
    gateway_flags: Sequence[str] = DEFAULT_GATEWAY_FLAGS
    controller: ServiceProcess | None = None
    workers: list[ServiceProcess | None] = field(default_factory=list)
    gateway: ServiceProcess | None = None
    # Exit codes of processes that were stopped or replaced, by name, in order.
    exits: list[tuple[str, int | None]] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        log_dir: Path,
        *,
        workers: int = 2,
        worker_flags: Sequence[str] = DEFAULT_WORKER_FLAGS,
        gateway_flags: Sequence[str] = DEFAULT_GATEWAY_FLAGS,
    ) -> Fleet:
        return cls(
            log_dir=log_dir,
            controller_port=free_port(),
            worker_ports=[free_port() for _ in range(workers)],
            gateway_port=free_port(),
            worker_flags=worker_flags,
            gateway_flags=gateway_flags,
            workers=[None] * workers,
        )

    # -- addresses and credentials ----------------------------------------------------------

    @property
    def controller_address(self) -> str:
        return f"{HOST}:{self.controller_port}"

    @property
    def worker_addresses(self) -> list[str]:
        return [f"{HOST}:{port}" for port in self.worker_ports]

    @property
    def gateway_url(self) -> str:
        return f"http://{HOST}:{self.gateway_port}"

    @property
    def security(self) -> GrpcSecurity:
        return GrpcSecurity(token=GRPC_TOKEN)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def pids(self) -> dict[str, int]:
        """Live processes by role name."""
        named = {"controller": self.controller, "gateway": self.gateway}
        named.update({f"worker{i}": worker for i, worker in enumerate(self.workers)})
        return {
            name: process.pid
            for name, process in named.items()
            if process is not None and process.returncode() is None
        }

    # -- lifecycle ---------------------------------------------------------------------------

    def _process(self, name: str, args: Sequence[str], log: str) -> ServiceProcess:
        return ServiceProcess(name, list(args), service_env(), str(self.log_dir / log))

    async def start(self) -> None:
        await self.start_controller()
        await asyncio.gather(*(self.start_worker(i) for i in range(len(self.workers))))
        self.gateway = self._process(
            "gateway",
            [
                "--host", HOST, "--port", str(self.gateway_port),
                "--controller-address", self.controller_address,
                "--api-keys", API_KEY, *self.gateway_flags,
            ],
            "gateway.log",
        )  # fmt: skip
        self.gateway.start()
        await self.gateway.wait_http_ok(f"{self.gateway_url}/health", READY_TIMEOUT_S)
        await self.wait_workers_serving()

    async def start_controller(self) -> None:
        self.controller = self._process(
            "controller",
            ["--host", HOST, "--port", str(self.controller_port), "--heartbeat-interval", "1"],
            "controller.log",
        )
        self.controller.start()
        await self.controller.wait_grpc_serving(self.controller_address, READY_TIMEOUT_S)

    async def start_worker(self, index: int) -> None:
        process = self._process(
            "worker",
            [
                "--host", HOST, "--port", str(self.worker_ports[index]),
                "--controller-address", self.controller_address,
                "--model-path", str(default_chat_model_path()),
                "--model-names", CHAT_MODEL, *self.worker_flags,
            ],
            f"worker{index}.log",
        )  # fmt: skip
        self.workers[index] = process
        process.start()
        await process.wait_grpc_serving(self.worker_addresses[index], READY_TIMEOUT_S)

    def worker(self, index: int) -> ServiceProcess:
        process = self.workers[index]
        assert process is not None
        return process

    def kill_worker(self, index: int) -> None:
        """SIGKILL: no drain, no deregistration, connections reset."""
        self.worker(index).signal(signal.SIGKILL)

    async def wait_exit(self, index: int, timeout: float) -> int:
        process = self.worker(index)
        code = await process.wait_exit(timeout)
        self.exits.append((f"worker{index}", code))
        self.workers[index] = None
        return code

    async def restart_controller(self, sig: int = signal.SIGTERM) -> int:
        """Stop the controller with `sig`, start a fresh one on the same port; its exit code."""
        assert self.controller is not None
        self.controller.signal(sig)
        code = await self.controller.wait_exit(60)
        self.exits.append(("controller", code))
        await self.start_controller()
        return code

    async def heal(self) -> None:
        """Start again every worker that is not running, then wait until all serve."""
        assert self.controller is not None
        if self.controller.returncode() is not None:
            self.exits.append(("controller", self.controller.returncode()))
            await self.start_controller()
        for index, process in enumerate(self.workers):
            if process is None or process.returncode() is not None:
                if process is not None:
                    self.exits.append((f"worker{index}", process.returncode()))
                await self.start_worker(index)
        await self.wait_workers_serving()

    async def stop(self) -> list[tuple[str, int | None]]:
        """SIGTERM everything still running (gateway first); their exit codes."""
        stopped = []
        for name, process in [
            ("gateway", self.gateway),
            *((f"worker{i}", w) for i, w in enumerate(self.workers)),
            ("controller", self.controller),
        ]:
            if process is not None and process.process is not None:
                if process.returncode() is not None:
                    self.exits.append((name, process.returncode()))
                    continue
                stopped.append((name, await process.stop(timeout=90)))
        self.exits.extend(stopped)
        return stopped

    def dump_logs(self) -> None:
        for path in sorted(self.log_dir.glob("*.log")):
            print(f"==== {path.name}\n{path.read_text(errors='replace')[-4000:]}")

    # -- observation -------------------------------------------------------------------------

    async def worker_states(self) -> dict[str, int]:
        """The controller's view: worker address -> WorkerState (proto enum value)."""
        async with open_channel(self.controller_address, self.security) as channel:
            stub = controller_pb2_grpc.ControllerServiceStub(channel)
            reply = await stub.ListWorkers(
                controller_pb2.ListWorkersRequest(), timeout=10, wait_for_ready=True
            )
        return {worker.address: worker.state for worker in reply.workers}

    async def wait_workers_serving(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Until the controller lists every worker as SERVING (re-registration after a restart)."""
        wanted = set(self.worker_addresses)
        serving = controller_pb2.WORKER_STATE_SERVING
        await self._wait_states(
            lambda states: wanted <= {a for a, s in states.items() if s == serving}, timeout
        )

    async def wait_worker_state(
        self, address: str, states: set[int | None], timeout: float
    ) -> int | None:
        """Until the controller reports `address` in one of `states` (None: not registered)."""
        reached = await self._wait_states(lambda seen: seen.get(address) in states, timeout)
        return reached.get(address)

    async def _wait_states(
        self, done: Callable[[dict[str, int]], bool], timeout: float
    ) -> dict[str, int]:
        """The controller's first view (worker address -> WorkerState) for which `done` holds,
        from its WatchWorkers stream: the controller pushes every change, across its restarts."""

        async def first() -> dict[str, int]:
            fleet = watch_fleet(self.controller_address, security=self.security)
            async with contextlib.aclosing(fleet) as replies:
                async for reply in replies:
                    states = {worker.address: worker.state for worker in reply.workers}
                    if done(states):
                        return states
            raise AssertionError("unreachable: watch_fleet never ends")

        return await asyncio.wait_for(first(), timeout)

    async def load(self, index: int) -> WorkerLoad | None:
        """GetLoad of one worker; None when it does not answer."""
        async with open_channel(self.worker_addresses[index], self.security) as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            try:
                reply = await stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5)
            except grpc.aio.AioRpcError:
                return None
        return WorkerLoad(running=reply.load.running, waiting=reply.load.waiting)

    async def loads(self) -> list[WorkerLoad | None]:
        return list(await asyncio.gather(*(self.load(i) for i in range(len(self.workers)))))

    async def wait_load(
        self, predicate: Callable[[list[WorkerLoad | None]], bool], timeout: float
    ) -> list[WorkerLoad | None]:
        """Until `predicate(loads)` holds; the workers push nothing, so ask again in a loop."""

        async def reached() -> list[WorkerLoad | None]:
            backoff = Backoff(first=0.02, cap=0.25)
            while True:
                loads = await self.loads()
                if predicate(loads):
                    return loads
                await backoff.sleep()

        return await asyncio.wait_for(reached(), timeout)

    async def gateway_ok(self) -> None:
        await asyncio.wait_for(wait_http_ok(f"{self.gateway_url}/health"), 60)
