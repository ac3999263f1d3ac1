"""A real stack for integration tests: controller, worker (default models) and gateway as separate
processes on free loopback ports, started once per session by the launcher `chatfleet up` uses."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.cli.launcher import ServiceProcess, free_port, wait_models_listed

READY_TIMEOUT_S = 300.0
HOST = "127.0.0.1"
CHAT_MODEL = "SmolLM2-135M-Instruct"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"


def service_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return env


@dataclass
class Stack:
    controller: ServiceProcess
    worker: ServiceProcess
    gateway: ServiceProcess
    controller_address: str
    worker_address: str
    gateway_url: str
    log_dir: Path

    def start(self) -> None:
        self.controller.start()
        asyncio.run(self.controller.wait_grpc_serving(self.controller_address, READY_TIMEOUT_S))
        self.worker.start()
        asyncio.run(self.worker.wait_grpc_serving(self.worker_address, READY_TIMEOUT_S))
        self.gateway.start()
        asyncio.run(self.gateway.wait_http_ok(f"{self.gateway_url}/health", READY_TIMEOUT_S))
        self.wait_models_listed()

    def wait_models_listed(self) -> None:
        asyncio.run(
            asyncio.wait_for(
                wait_models_listed(self.controller_address, [CHAT_MODEL, EMBEDDING_MODEL]),
                READY_TIMEOUT_S,
            )
        )

    def stop(self) -> None:
        for process in (self.gateway, self.worker, self.controller):
            asyncio.run(process.stop())

    def restart_controller(self) -> None:
        """Stop the controller and start a fresh one on the same port (it keeps no state)."""
        asyncio.run(self.controller.stop())
        old = self.controller
        self.controller = ServiceProcess("controller", old.args, old.env, old.log_path)
        self.controller.start()
        asyncio.run(self.controller.wait_grpc_serving(self.controller_address, READY_TIMEOUT_S))

    def dump_logs(self) -> None:
        for path in sorted(self.log_dir.glob("*.log")):
            print(f"==== {path.name}\n{path.read_text()[-4000:]}")


def make_stack(log_dir: Path, extra_worker_args: Sequence[str] = ()) -> Stack:
    """A stack whose worker also gets `extra_worker_args` (for example --model-path and
    --model-names to serve the default model under more names)."""
    env = service_env()
    controller_port, worker_port, gateway_port = free_port(), free_port(), free_port()
    controller_address = f"{HOST}:{controller_port}"
    worker_args = [
        "--host", HOST, "--port", str(worker_port),
        "--controller-address", controller_address, "--device", "cpu", *extra_worker_args,
    ]  # fmt: skip
    gateway_args = [
        "--host", HOST, "--port", str(gateway_port), "--controller-address", controller_address
    ]  # fmt: skip
    return Stack(
        controller=ServiceProcess(
            "controller", ["--host", HOST, "--port", str(controller_port)], env,
            str(log_dir / "controller.log"),
        ),
        worker=ServiceProcess("worker", worker_args, env, str(log_dir / "worker.log")),
        gateway=ServiceProcess("gateway", gateway_args, env, str(log_dir / "gateway.log")),
        controller_address=controller_address,
        worker_address=f"{HOST}:{worker_port}",
        gateway_url=f"http://{HOST}:{gateway_port}",
        log_dir=log_dir,
    )  # fmt: skip


# The session's `stack` fixture lives in tests/conftest.py, so the browser tests (tests/e2e) share
# the one stack with these.
