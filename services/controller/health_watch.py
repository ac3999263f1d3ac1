"""Liveness of registered workers from grpc.health.v1 Watch streams, one task per worker.

Every Watch message sets the worker's state; a broken stream marks it UNREACHABLE at once (a dead
process resets the connection, a silent host is caught by channel keepalive) and the task reconnects
with backoff for as long as the worker stays registered, or until it has been unreachable for
`forget_after` seconds: then the worker is dropped from the registry, so a fleet whose workers come
and go (autoscaling, pod IPs that change) does not accumulate dead entries. A worker that comes back
is told to re-register by its next heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.backoff import Backoff
from services.common.grpc_server import insecure_channel
from services.controller.registry import WorkerRegistry, WorkerState

logger = logging.getLogger(__name__)

_STATES = {
    health_pb2.HealthCheckResponse.SERVING: WorkerState.SERVING,
    health_pb2.HealthCheckResponse.NOT_SERVING: WorkerState.NOT_SERVING,
}


@dataclass
class _Watch:
    task: asyncio.Task[None] | None = None
    # Set by watch() on a re-registration: skip the rest of the backoff and reconnect now.
    retry_now: asyncio.Event = field(default_factory=asyncio.Event)


class HealthWatcher:
    """Holds one health Watch stream per watched worker and writes its state into the registry."""

    def __init__(
        self,
        registry: WorkerRegistry,
        *,
        channel_factory: Callable[[str], grpc.aio.Channel] = insecure_channel,
        min_backoff: float = 0.2,
        max_backoff: float = 2.0,
        forget_after: float = 0.0,
    ) -> None:
        self._registry = registry
        self._forget_after = forget_after  # 0: never
        self._channel_factory = channel_factory
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._watches: dict[str, _Watch] = {}

    def watch(self, address: str) -> None:
        """Start watching a worker; when already watched, reconnect now if the stream is down."""
        existing = self._watches.get(address)
        if existing is not None:
            existing.retry_now.set()
            return
        watch = _Watch()
        watch.task = asyncio.create_task(self._run(address, watch), name=f"health-watch {address}")
        self._watches[address] = watch

    async def unwatch(self, address: str) -> None:
        """Stop watching a worker and wait for its stream to be closed."""
        watch = self._watches.pop(address, None)
        if watch is not None and watch.task is not None:
            watch.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch.task

    async def close(self) -> None:
        """Stop every watch."""
        for address in list(self._watches):
            await self.unwatch(address)

    async def wait_for_state(
        self, address: str, states: Collection[WorkerState | None], timeout: float
    ) -> WorkerState | None:
        """Wait until the worker is in one of `states` (None: not registered); returns its state,
        which may be another one (or None when deregistered) if `timeout` seconds pass first."""
        with contextlib.suppress(asyncio.TimeoutError):
            async with asyncio.timeout(timeout):
                async with contextlib.aclosing(self._registry.changes()) as changes:
                    async for _ in changes:
                        if self._registry.state(address) in states:
                            break
        return self._registry.state(address)

    def _set_state(self, address: str, state: WorkerState) -> None:
        previous = self._registry.set_state(address, state)
        if previous is not None and previous is not state:
            logger.info("worker %s is now %s (was %s)", address, state.value, previous.value)

    def _forget(self, address: str, watch: _Watch, down_for: float) -> None:
        if self._watches.get(address) is watch:
            del self._watches[address]
        self._registry.deregister(address)
        logger.warning(
            "worker %s unreachable for %.0f s: dropped from the registry (it re-registers when "
            "it is back)",
            address,
            down_for,
        )

    async def _run(self, address: str, watch: _Watch) -> None:
        loop = asyncio.get_running_loop()
        backoff = Backoff(self._min_backoff, self._max_backoff)
        down_since: float | None = None
        while True:
            watch.retry_now.clear()
            try:
                async with self._channel_factory(address) as channel:
                    stub = health_pb2_grpc.HealthStub(channel)
                    # No wait_for_ready: a Watch to a dead process fails at once with UNAVAILABLE.
                    responses = stub.Watch(health_pb2.HealthCheckRequest(service=""))
                    async for response in responses:
                        state = _STATES.get(response.status, WorkerState.NOT_SERVING)
                        self._set_state(address, state)
                        backoff.reset()
                        down_since = None
                problem = "the server ended it"
            except grpc.aio.AioRpcError as error:
                problem = f"{error.code().name} {error.details()}"
            # Warn once per outage; the retries of a worker that stays down are debug noise.
            already_down = self._registry.state(address) is WorkerState.UNREACHABLE
            logger.log(
                logging.DEBUG if already_down else logging.WARNING,
                "health stream of worker %s failed: %s",
                address,
                problem,
            )
            self._set_state(address, WorkerState.UNREACHABLE)
            down_since = loop.time() if down_since is None else down_since
            if self._forget_after and loop.time() - down_since >= self._forget_after:
                self._forget(address, watch, loop.time() - down_since)
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(watch.retry_now.wait(), backoff.step())
