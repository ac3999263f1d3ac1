"""The worker's link to the controller: register, report load by heartbeat, register again when the
controller forgets the worker (it restarted) or cannot be reached, deregister on shutdown.

A health Watch stream on the controller notices a restart within about a second, where heartbeats
would take up to an interval: when the stream breaks, or reports SERVING after it had been lost, the
worker registers at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatfleet.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from services.common.backoff import Backoff
from services.common.grpc_server import open_channel
from services.common.security import NO_SECURITY, GrpcSecurity

logger = logging.getLogger(__name__)

# Shutdown should not hang on a controller that does not answer.
_DEREGISTER_TIMEOUT_S = 2.0
# The longest wait between two attempts to reach a controller that is down (the channel's connection
# attempts and the Watch's retries): a controller back up is noticed within about this long.
_MAX_RECONNECT_BACKOFF_S = 1.0


class ControllerLink:
    """Keeps one worker registered with the controller for as long as it runs.

    `models` and `load` are called for every registration and heartbeat, so they report the
    worker's state at that moment. `registered` is set while the worker believes the controller
    knows it.
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
        security: GrpcSecurity = NO_SECURITY,
    ) -> None:
        self.controller_address = controller_address
        self.worker_address = worker_address
        self._models = models
        self._load = load
        self._heartbeat_interval = heartbeat_interval
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._rpc_timeout = rpc_timeout
        self._security = security
        self._channel: grpc.aio.Channel | None = None
        self._stub: controller_pb2_grpc.ControllerServiceStub | None = None
        self._stopping = asyncio.Event()
        # Set by the health watch to cut a heartbeat or backoff wait short and register now.
        self._register_now = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._failed_registrations = 0
        # Set once the health Watch has had its first answer, or its first attempt failed.
        self._watch_answered = asyncio.Event()
        self.registered = asyncio.Event()

    async def start(self) -> None:
        """Try to register once (so a healthy controller knows the worker when this returns),
        then keep the registration alive in the background.

        The health Watch is opened first: once its stream is up, a controller that restarts at
        any moment after it (even before the registration below) breaks the stream, and the worker
        registers again. Opened after, the Watch could connect to an already restarted controller
        and take it for the one the worker registered with."""
        self._channel = open_channel(
            self.controller_address,
            self._security,
            max_reconnect_backoff_ms=int(_MAX_RECONNECT_BACKOFF_S * 1000),
        )
        self._stub = controller_pb2_grpc.ControllerServiceStub(self._channel)
        self._tasks = [
            asyncio.create_task(self._watch_controller(), name="controller-health-watch")
        ]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._watch_answered.wait(), self._rpc_timeout)
        await self._register()
        self._tasks.append(asyncio.create_task(self._run(), name="controller-link"))

    async def stop(self, *, deregister: bool = True) -> None:
        """Stop heartbeating and, unless told otherwise, deregister from the controller. Does
        nothing the second time."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        # Do not wait out a registration attempt against a slow controller.
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
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
        """Heartbeat while registered; otherwise register, with backoff between failures."""
        backoff = Backoff(self._min_backoff, self._max_backoff)
        while not self._stopping.is_set():
            if self.registered.is_set():
                if not await self._wait(self._heartbeat_interval):
                    await self._heartbeat()
            elif await self._register():
                backoff.reset()
            elif not await self._wait(backoff.delay):
                backoff.step()

    async def _watch_controller(self) -> None:
        """Hold a health Watch on the controller. Register at once when the stream breaks (the
        controller died or restarted), or when it reports SERVING after the controller was lost
        or before the worker got registered."""
        assert self._channel is not None
        health = health_pb2_grpc.HealthStub(self._channel)
        lost = False
        backoff = Backoff(
            min(self._min_backoff, _MAX_RECONNECT_BACKOFF_S), _MAX_RECONNECT_BACKOFF_S
        )
        first = True
        while True:
            # wait_for_ready: while the controller is down the call waits for the channel to
            # connect (an attempt every _MAX_RECONNECT_BACKOFF_S at most) instead of failing.
            # Not on the first attempt, which start() waits for: a controller that is down then
            # fails it at once.
            call = health.Watch(health_pb2.HealthCheckRequest(service=""), wait_for_ready=not first)
            # Why the stream ended; None when the controller said it is not serving.
            problem: str | None = "the controller ended the stream"
            try:
                async for response in call:
                    self._watch_answered.set()
                    if response.status != health_pb2.HealthCheckResponse.SERVING:
                        # It is shutting down: drop the stream (its graceful stop would wait for
                        # it) and do not register with it.
                        problem = None
                        break
                    backoff.reset()
                    if lost or not self.registered.is_set():
                        logger.info("the controller at %s is serving", self.controller_address)
                        lost = False
                        self._request_registration()
            except grpc.aio.AioRpcError as error:
                problem = f"{error.code().name} {error.details()}"
            finally:
                call.cancel()
            if first and not self._watch_answered.is_set():
                # The controller was not there to begin with: start()'s registration attempt
                # says so; register once it answers.
                lost = True
                self._watch_answered.set()
            first = False
            if not lost:
                lost = True
                if problem is None:
                    logger.info("the controller at %s is not serving", self.controller_address)
                else:
                    logger.warning(
                        "lost the controller at %s (%s); registering again",
                        self.controller_address,
                        problem,
                    )
                    self._request_registration()
            # A refused or ended Watch means the controller is on its way out: pause, retry.
            await backoff.sleep()

    def _request_registration(self) -> None:
        self.registered.clear()
        self._register_now.set()

    async def _register(self) -> bool:
        assert self._stub is not None
        # This attempt answers every request made so far; one made while it runs may mean that it
        # reached a controller on its way out, so it is not counted as a registration.
        self._register_now.clear()
        request = controller_pb2.RegisterWorkerRequest(
            address=self.worker_address, models=list(self._models()), load=self._load()
        )
        try:
            response = await self._stub.RegisterWorker(request, timeout=self._rpc_timeout)
        except grpc.aio.AioRpcError as error:
            self._failed_registrations += 1
            # Warn once per outage; the retries while the controller stays down are debug noise.
            logger.log(
                logging.WARNING if self._failed_registrations == 1 else logging.DEBUG,
                "cannot register with the controller at %s: %s %s",
                self.controller_address,
                error.code().name,
                error.details(),
            )
            return False
        self._failed_registrations = 0
        if 0 < response.heartbeat_interval_seconds < self._heartbeat_interval:
            self._heartbeat_interval = float(response.heartbeat_interval_seconds)
        if self._register_now.is_set():
            return True  # register again at once
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
        """Wait `seconds`, or less when a registration is requested; True when cut short."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._register_now.wait(), seconds)
        return self._register_now.is_set()
