"""Starts chatfleet services as child processes and waits until each reports ready.

Used by `chatfleet up` and by the integration tests, so both exercise the same start-up path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatfleet.v1 import controller_pb2, controller_pb2_grpc
from services.common.backoff import Backoff
from services.common.grpc_server import open_channel
from services.common.security import GrpcSecurity, security_from_environ

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free right now on host (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ServiceExited(RuntimeError):
    """A service process ended before it became ready."""


@dataclass
class ServiceProcess:
    """One `chatfleet <service>` child process."""

    name: str
    args: Sequence[str]
    env: Mapping[str, str] | None = None
    log_path: str | None = None
    # stdout and stderr into one pipe, `process.stdout`, for the caller to read (`chatfleet up`
    # turns it into progress lines); otherwise they go to log_path, or are inherited.
    capture_output: bool = False
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> None:
        env = dict(os.environ if self.env is None else self.env)
        stdout: Any = None
        if self.capture_output:
            stdout = subprocess.PIPE
        elif self.log_path:
            stdout = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", self.name, *self.args],
            env=env,
            stdout=stdout,
            stderr=subprocess.STDOUT if stdout else None,
        )
        if stdout and stdout is not subprocess.PIPE:
            stdout.close()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    async def wait_exit(self, timeout: float | None = None) -> int:
        """Wait for the process to end and return its exit code."""
        assert self.process is not None
        await asyncio.wait_for(_exited(self.process), timeout)
        return self.process.wait()

    def signal(self, sig: int) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    async def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not ended within timeout."""
        if self.process is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return await self.wait_exit(timeout)
        except TimeoutError:
            logger.warning("%s did not stop within %.0f s; killing it", self.name, timeout)
            self.process.kill()
            return await self.wait_exit(timeout)

    async def _watch_exit(self) -> None:
        code = await self.wait_exit()
        raise ServiceExited(f"{self.name} exited with code {code} before it was ready")

    async def _until_exit_or(self, waiter: asyncio.Future[None], timeout: float) -> None:
        watcher = asyncio.ensure_future(self._watch_exit())
        try:
            done, _ = await asyncio.wait(
                {watcher, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                raise TimeoutError(f"{self.name} not ready within {timeout:.0f} s")
            for task in done:
                task.result()
        finally:
            for task in (watcher, waiter):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ServiceExited):
                await asyncio.gather(watcher, waiter)

    async def wait_grpc_serving(self, address: str, timeout: float) -> None:
        """Ready when the server's grpc.health.v1 Watch says SERVING."""
        # The services take their token and TLS settings from this environment too.
        security = security_from_environ(os.environ if self.env is None else self.env)
        await self._until_exit_or(
            asyncio.ensure_future(wait_grpc_serving(address, security=security)), timeout
        )

    async def wait_http_ok(self, url: str, timeout: float) -> None:
        """Ready when GET url answers 200."""
        await self._until_exit_or(asyncio.ensure_future(wait_http_ok(url)), timeout)


async def _exited(process: subprocess.Popen[bytes]) -> None:
    """Return once process has ended, woken by its pidfd rather than by polling or a thread
    (a thread blocked in wait() would keep asyncio.run from returning)."""
    if process.poll() is not None:
        return
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not done.done():
            done.set_result(None)

    fd = os.pidfd_open(process.pid)
    try:
        loop.add_reader(fd, readable)
        try:
            await done
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


async def wait_grpc_serving(
    address: str, service: str = "", *, security: GrpcSecurity | None = None
) -> None:
    """Return once the health service at address reports SERVING. The Watch stream pushes every
    change, so this waits on the server rather than polling; a refused connection is retried
    with backoff because the process may not be listening yet."""
    backoff = Backoff()
    while True:
        async with open_channel(address, _security(security)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                async for reply in stub.Watch(
                    health_pb2.HealthCheckRequest(service=service), wait_for_ready=True
                ):
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
        await backoff.sleep()


async def wait_http_ok(url: str) -> None:
    """Return once GET url answers 200, retrying refused connections with backoff."""
    backoff = Backoff()
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            try:
                if (await client.get(url)).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await backoff.sleep()


async def watch_fleet(
    controller_address: str, *, security: GrpcSecurity | None = None
) -> AsyncGenerator[controller_pb2.WatchWorkersResponse, None]:
    """The controller's fleet now and after every change, from its WatchWorkers stream (pushed,
    not polled). The stream is opened again, with backoff, when the controller is not there yet or
    ends it (a controller restarting), so the fleet of the new one follows. Iterate it within
    `contextlib.aclosing`."""
    backoff = Backoff(cap=0.5)
    async with open_channel(controller_address, _security(security)) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        while True:
            call = stub.WatchWorkers(controller_pb2.WatchWorkersRequest(), wait_for_ready=True)
            try:
                async for reply in call:
                    backoff.reset()
                    yield reply
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
            finally:
                call.cancel()
            await backoff.sleep()


async def wait_models_listed(
    controller_address: str, names: Sequence[str], *, security: GrpcSecurity | None = None
) -> None:
    """Return once the controller lists every model in names (a worker registers right after it
    turns SERVING, so this is usually immediate)."""
    wanted = set(names)
    async with contextlib.aclosing(watch_fleet(controller_address, security=security)) as fleet:
        async for reply in fleet:
            if wanted <= {model.name for model in reply.models}:
                return


def _security(security: GrpcSecurity | None) -> GrpcSecurity:
    """The given settings, else the CHATFLEET_GRPC_TOKEN / CHATFLEET_TLS_* ones of this process."""
    return security_from_environ(os.environ) if security is None else security
