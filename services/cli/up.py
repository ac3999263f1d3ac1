"""`chatfleet up`: controller, worker and gateway on one machine with the default models."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from services.cli.launcher import ServiceExited, ServiceProcess
from services.cli.main import new_parser, run
from services.common.config import FlagParser

# Loading the default models from disk takes a few seconds on a laptop; slow disks get more.
READY_TIMEOUT_S = 600.0


def build_parser() -> tuple[argparse.ArgumentParser, FlagParser]:
    parser, flags = new_parser(
        "up", "Start controller, worker and gateway on this machine and print the URL."
    )
    flags.add("--host", default="127.0.0.1", help="address every service binds")
    flags.add("--port", default=8000, type=int, help="gateway HTTP port", env="CHATFLEET_UP_PORT")
    flags.add("--controller-port", default=21001, type=int, help="controller gRPC port")
    flags.add("--worker-port", default=21002, type=int, help="worker gRPC port")
    flags.add("--device", default="auto", help="worker device: auto, cpu, cuda, cuda:N or mps")
    flags.add("--dtype", default="auto", help="worker dtype: auto, float32, float16 or bfloat16")
    flags.add(
        "--api-keys",
        default=[],
        nargs="*",
        help="keys the gateway requires as 'Authorization: Bearer KEY' (comma-separated in env)",
        env="CHATFLEET_UP_API_KEYS",
    )
    flags.add("--log-level", default="INFO", help="log level of every service")
    return parser, flags


async def up(
    host: str,
    port: int,
    controller_port: int,
    worker_port: int,
    device: str,
    dtype: str,
    api_keys: list[str],
    log_level: str,
) -> int:
    controller_address = f"{host}:{controller_port}"
    worker_address = f"{host}:{worker_port}"
    common = ["--log-level", log_level]
    controller = ServiceProcess(
        "controller", ["--host", host, "--port", str(controller_port), *common]
    )
    worker = ServiceProcess(
        "worker",
        [
            "--host", host, "--port", str(worker_port),
            "--controller-address", controller_address,
            "--device", device, "--dtype", dtype, *common,
        ],
    )  # fmt: skip
    gateway_args = ["--host", host, "--port", str(port), "--controller-address", controller_address]
    if api_keys:
        gateway_args += ["--api-keys", ",".join(api_keys)]
    gateway = ServiceProcess("gateway", [*gateway_args, *common])
    started: list[ServiceProcess] = []

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        print("chatfleet: starting the controller...", flush=True)
        controller.start()
        started.append(controller)
        await controller.wait_grpc_serving(controller_address, READY_TIMEOUT_S)
        print("chatfleet: starting the worker (loading the default models)...", flush=True)
        worker.start()
        started.append(worker)
        await worker.wait_grpc_serving(worker_address, READY_TIMEOUT_S)
        gateway.start()
        started.append(gateway)
        url = f"http://{host}:{port}"
        await gateway.wait_http_ok(f"{url}/health", READY_TIMEOUT_S)
        print(
            f"\nchatfleet is up: {url}  (OpenAI API at {url}/v1)\n"
            f"  controller gRPC {controller_address}, worker gRPC {worker_address}\n"
            f"  try: curl {url}/v1/chat/completions -H 'Content-Type: application/json' "
            """-d '{"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", """
            """"content": "What is the capital of France?"}]}'\n"""
            "Press Ctrl-C to stop.",
            flush=True,
        )
        exits = [asyncio.ensure_future(p.wait_exit()) for p in started]
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({stopper, *exits}, return_when=asyncio.FIRST_COMPLETED)
        for task in (stopper, *exits):
            task.cancel()
        if stopper not in done:
            print("chatfleet: a service exited; stopping the others", file=sys.stderr)
            return 1
        return 0
    except (ServiceExited, TimeoutError) as error:
        print(f"chatfleet: {error}", file=sys.stderr)
        return 1
    finally:
        print("chatfleet: stopping...", flush=True)
        for process in reversed(started):
            with contextlib.suppress(ProcessLookupError):
                await process.stop()


def main(argv: list[str] | None = None) -> int:
    parser, _ = build_parser()
    ns = parser.parse_args(argv)
    return run(
        up(
            ns.host,
            ns.port,
            ns.controller_port,
            ns.worker_port,
            ns.device,
            ns.dtype,
            ns.api_keys,
            ns.log_level,
        )
    )
