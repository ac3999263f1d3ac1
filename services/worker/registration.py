"""The worker's link to the controller: register, report load by heartbeat, register again when the
controller forgets the worker (it restarted) or cannot be reached, deregister on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

import grpc

from chatfleet.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from services.common.grpc_server import insecure_channel

logger = logging.getLogger(__name__)

# Shutdown should not hang on a controller that does not answer.
_DEREGISTER_TIMEOUT_S = 2.0


class ControllerLink:
    """Keeps one worker registered with the controller for as long as it runs.

    `models` and `load` are called for every registration and heartbeat, so they report the
    worker's state at that moment.
    """

    def __init__(
        self,
        *,
        controller_address: str,
        worker_address: str,
        models: Callable[[], Sequence[common_pb2.ModelInfo]],
        load: Callable[[], common_pb2.Load],
        heartbeat_interval: float,
        min_backoff: float = 0.2,
        max_backoff: float = 3.0,
        rpc_timeout: float = 5.0,
    ) -> None:
        self.controller_address = controller_address
        self.worker_address = worker_address
        self._models = models
        self._load = load
        self._heartbeat_interval = heartbeat_interval
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._rpc_timeout = rpc_timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: controller_pb2_grpc.ControllerServiceStub | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.registered = asyncio.Event()

    async def start(self) -> None:
        """Try to register once (so a healthy controller knows the worker when this returns),
        then keep the registration alive in the background."""
        self._channel = insecure_channel(self.controller_address)
        self._stub = controller_pb2_grpc.ControllerServiceStub(self._channel)
        await self._register()
        self._task = asyncio.create_task(self._run(), name="controller-link")

    async def stop(self, *, deregister: bool = True) -> None:
        """Stop heartbeating and, unless told otherwise, deregister from the controller. Does
        nothing the second time."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._task is not None:
            # Do not wait out a registration attempt against a slow controller.
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # Deregister even if the last attempt looked failed: it may have reached the controller.
        if deregister and self._stub is not None:
            request = controller_pb2.DeregisterWorkerRequest(address=self.worker_address)
            try:
                await self._stub.DeregisterWorker(request, timeout=_DEREGISTER_TIMEOUT_S)
                logger.info("deregistered from the controller at %s", self.controller_address)
            except grpc.aio.AioRpcError as error:
                logger.warning("could not deregister: %s %s", error.code().name, error.details())
        self.registered.clear()
        if self._channel is not None:
            await self._channel.close()

    async def _run(self) -> None:
        backoff = self._min_backoff
        while not self._stopping.is_set():
            if not self.registered.is_set():
                if await self._register():
                    backoff = self._min_backoff
                    continue
                await self._wait(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            if await self._wait(self._heartbeat_interval):
                return
            await self._heartbeat()

    async def _register(self) -> bool:
        assert self._stub is not None
        request = controller_pb2.RegisterWorkerRequest(
            address=self.worker_address, models=list(self._models()), load=self._load()
        )
        try:
            response = await self._stub.RegisterWorker(request, timeout=self._rpc_timeout)
        except grpc.aio.AioRpcError as error:
            logger.warning(
                "cannot register with the controller at %s: %s %s",
                self.controller_address,
                error.code().name,
                error.details(),
            )
            return False
        if 0 < response.heartbeat_interval_seconds < self._heartbeat_interval:
            self._heartbeat_interval = float(response.heartbeat_interval_seconds)
        self.registered.set()
        logger.info("registered as %s with %s", self.worker_address, self.controller_address)
        return True

    async def _heartbeat(self) -> None:
        assert self._stub is not None
        request = controller_pb2.HeartbeatRequest(address=self.worker_address, load=self._load())
        try:
            response = await self._stub.Heartbeat(request, timeout=self._rpc_timeout)
        except grpc.aio.AioRpcError as error:
            logger.warning(
                "heartbeat to the controller failed (%s); registering again", error.code().name
            )
            self.registered.clear()
            return
        if response.reregister:
            logger.info("the controller does not know this worker (it restarted); registering")
            self.registered.clear()

    async def _wait(self, seconds: float) -> bool:
        """Wait `seconds` or until stop; True when stopping."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()
