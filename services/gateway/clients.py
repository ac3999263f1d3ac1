"""The gateway's gRPC side: the controller client, a pool of worker channels, the calls using them.

A request asks the controller for a worker (SelectWorker), then calls that worker directly. Failures
the client never sees:
- a worker that answers UNAVAILABLE (dead, draining) or RESOURCE_EXHAUSTED (full) before producing
  anything is excluded and another one is asked for; when the controller has no other to offer,
  the last error stands (503, or 429 with Retry-After when every worker is full);
- while the controller cannot be reached, has no healthy worker for the model, or no longer knows a
  model it served before (it restarted and the workers are registering again), selection is
  retried with backoff for up to --select-timeout.
Once a worker has produced output a failure is final: the client has seen part of the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatfleet.v1 import (
    common_pb2,
    controller_pb2,
    controller_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from services.common.backoff import Backoff
from services.common.errors import ChatfleetError, OverloadedError, UnavailableError
from services.common.grpc_server import open_channel
from services.common.security import NO_SECURITY, GrpcSecurity
from services.gateway.config import GatewayConfig

logger = logging.getLogger(__name__)

# /health answers quickly even when the controller hangs.
HEALTH_TIMEOUT_SECONDS = 2.0
# Waits between two worker selections while the controller or the fleet recovers.
_SELECT_MIN_BACKOFF_S = 0.05
_SELECT_MAX_BACKOFF_S = 0.5
# Worker errors after which another worker is tried, if nothing was produced yet.
_RETRIABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})

Metadata = tuple[tuple[str, str], ...]
T = TypeVar("T")
# What one attempt calls on the worker at `address`, for the model it serves there as `model`.
WorkerCall = Callable[[str, str], AsyncGenerator[T, None]]


class Deadline:
    """The time left for one HTTP request, shared by every gRPC call made on its behalf;
    `seconds=None` sets no limit."""

    def __init__(self, seconds: float | None) -> None:
        self._loop = asyncio.get_running_loop()
        self._end = math.inf if seconds is None else self._loop.time() + seconds

    def remaining(self) -> float | None:
        """Seconds left (None: no limit); raises DEADLINE_EXCEEDED as a gRPC error would when
        none are."""
        if self._end == math.inf:
            return None
        left = self._end - self._loop.time()
        if left <= 0:
            raise DeadlineExceededError()
        return left

    def within(self, seconds: float) -> float:
        """The time left, at most `seconds`."""
        left = self.remaining()
        return seconds if left is None else min(left, seconds)


class DeadlineExceededError(grpc.aio.AioRpcError):
    """The request's budget ran out between two gRPC calls."""

    def __init__(self) -> None:
        super().__init__(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details="Deadline Exceeded",
        )


class UpstreamAuthError(ChatfleetError):
    """An internal service refused the gateway's credentials (gRPC token, TLS certificate): a
    deployment mistake, reported as a 500, never as the client's 401."""


def _auth_failure(error: grpc.aio.AioRpcError, address: str) -> UpstreamAuthError:
    # The details (which server, why) are for the operator's log, not for API clients.
    logger.error("%s refused the gateway's credentials: %s", address, error.details())
    return UpstreamAuthError(
        "the gateway could not authenticate to its backend services: "
        "check its --grpc-token and --tls-* settings"
    )


class ControllerClient:
    """The controller's ControllerService and health service over one channel."""

    def __init__(self, address: str, security: GrpcSecurity = NO_SECURITY) -> None:
        self.address = address
        self._channel = open_channel(address, security)
        self._stub = controller_pb2_grpc.ControllerServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def list_models(
        self, *, timeout: float | None, metadata: Metadata = ()
    ) -> list[common_pb2.ModelInfo]:
        response = await self._stub.ListModels(
            controller_pb2.ListModelsRequest(), timeout=timeout, metadata=metadata
        )
        return list(response.models)

    async def select_worker(
        self,
        model: str,
        *,
        exclude: Sequence[str],
        timeout: float | None,
        metadata: Metadata = (),
    ) -> controller_pb2.SelectWorkerResponse:
        request = controller_pb2.SelectWorkerRequest(model=model, exclude_addresses=exclude)
        # wait_for_ready: while the controller is down (restarting) the call waits for it to
        # listen again, within `timeout`, instead of failing at once.
        response: controller_pb2.SelectWorkerResponse = await self._stub.SelectWorker(
            request, timeout=timeout, metadata=metadata, wait_for_ready=True
        )
        return response

    async def is_serving(self) -> bool:
        """True when the controller answers its health check with SERVING."""
        try:
            response = await self._health.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as error:
            logger.warning("controller %s health check failed: %s", self.address, error.code().name)
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        await self._channel.close()


class WorkerPool:
    """One channel per worker address, opened on first use and reused by every later request."""

    def __init__(self, security: GrpcSecurity = NO_SECURITY) -> None:
        self._security = security
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, worker_pb2_grpc.WorkerServiceStub] = {}

    def stub(self, address: str) -> worker_pb2_grpc.WorkerServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = open_channel(address, self._security)
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            self._channels[address] = channel
            self._stubs[address] = stub
        return stub

    def __len__(self) -> int:
        return len(self._channels)

    async def close(self) -> None:
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        await asyncio.gather(*(channel.close() for channel in channels))


class Upstream:
    """What the HTTP handlers call: models, generation and embeddings, routed through the
    controller to a worker, with the retries described in the module docstring and a bound on the
    calls in flight."""

    def __init__(
        self,
        controller: ControllerClient,
        workers: WorkerPool,
        *,
        worker_retries: int,
        select_timeout: float = GatewayConfig.select_timeout_seconds,
        max_concurrent_calls: int = GatewayConfig.max_concurrent_calls,
    ) -> None:
        self.controller = controller
        self.workers = workers
        self.worker_retries = worker_retries
        self.select_timeout = select_timeout
        self.max_concurrent_calls = max_concurrent_calls
        self._in_flight = 0
        # Models some worker served: a NOT_FOUND for one of them is a fleet recovering (the
        # controller restarted), not a typo. Bounded by the names the controller ever offered.
        self._known_models: set[str] = set()

    @property
    def in_flight(self) -> int:
        """Generation and embedding calls under way."""
        return self._in_flight

    async def list_models(
        self, *, deadline: Deadline, metadata: Metadata = ()
    ) -> list[common_pb2.ModelInfo]:
        try:
            return await self.controller.list_models(
                timeout=deadline.remaining(), metadata=metadata
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                raise _auth_failure(error, self.controller.address) from None
            raise

    async def generate(
        self, request: worker_pb2.GenerateRequest, *, deadline: Deadline, metadata: Metadata = ()
    ) -> AsyncGenerator[worker_pb2.GenerateResponse, None]:
        """Stream a completion from a worker chosen by the controller.

        Closing the iterator, or cancelling the task reading it, cancels the gRPC call, and the
        worker frees the request's slot.
        """

        async def attempt(
            address: str, model: str
        ) -> AsyncGenerator[worker_pb2.GenerateResponse, None]:
            routed = worker_pb2.GenerateRequest()
            routed.CopyFrom(request)
            routed.model = model
            call = self.workers.stub(address).Generate(
                routed, timeout=deadline.remaining(), metadata=metadata
            )
            try:
                async for response in call:
                    yield response
            finally:
                # A no-op once the call ended; otherwise the consumer stopped early.
                call.cancel()

        with self._admitted():
            responses = self._failover(
                request.model, request.request_id, deadline, metadata, attempt
            )
            async with contextlib.aclosing(responses):
                async for response in responses:
                    yield response

    async def embed(
        self, request: worker_pb2.EmbedRequest, *, deadline: Deadline, metadata: Metadata = ()
    ) -> worker_pb2.EmbedResponse:
        async def attempt(
            address: str, model: str
        ) -> AsyncGenerator[worker_pb2.EmbedResponse, None]:
            routed = worker_pb2.EmbedRequest()
            routed.CopyFrom(request)
            routed.model = model
            response: worker_pb2.EmbedResponse = await self.workers.stub(address).Embed(
                routed, timeout=deadline.remaining(), metadata=metadata
            )
            yield response

        with self._admitted():
            responses = self._failover(
                request.model, request.request_id, deadline, metadata, attempt
            )
            async with contextlib.aclosing(responses):
                async for response in responses:
                    return response
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def tokenize(
        self, model: str, text: str, *, deadline: Deadline, metadata: Metadata = ()
    ) -> worker_pb2.TokenizeResponse:
        """Count `text`'s tokens on a worker serving `model` (a cheap call: no retry)."""
        with self._admitted():
            selection = await self._select(model, (), deadline, metadata)
            request = worker_pb2.TokenizeRequest(model=selection.model.name or model, text=text)
            try:
                response: worker_pb2.TokenizeResponse = await self.workers.stub(
                    selection.address
                ).Tokenize(request, timeout=deadline.remaining(), metadata=metadata)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise _auth_failure(error, selection.address) from None
                raise
            return response

    async def _failover(
        self,
        model: str,
        request_id: str,
        deadline: Deadline,
        metadata: Metadata,
        call: WorkerCall[T],
    ) -> AsyncGenerator[T, None]:
        """What `call` yields on a worker the controller selects for `model`; a worker that fails
        with a retriable error before yielding anything is excluded and `call` tried on another,
        up to --worker-retries times (the module docstring tells the rules)."""
        excluded: list[str] = []
        last_error: grpc.aio.AioRpcError | None = None
        for attempt in range(self.worker_retries + 1):
            selection = await self._select(model, excluded, deadline, metadata)
            if last_error is not None and selection.address in excluded:
                raise last_error  # only workers that failed already are left
            produced = False
            items = call(selection.address, selection.model.name or model)
            try:
                async for item in items:
                    produced = True
                    yield item
                return
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                    raise _auth_failure(error, selection.address) from None
                if produced or not self._retry(error, request_id, selection.address, attempt):
                    raise
                excluded.append(selection.address)
                last_error = error
            finally:
                await items.aclose()

    def _retry(
        self, error: grpc.aio.AioRpcError, request_id: str, address: str, attempt: int
    ) -> bool:
        """Whether to try another worker after `error` (nothing having been produced)."""
        if error.code() not in _RETRIABLE or attempt == self.worker_retries:
            return False
        # A full worker is routine under load; a worker that went away is worth a warning.
        full = error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        logger.log(
            logging.DEBUG if full else logging.WARNING,
            "request %s: worker %s answered %s (%s); asking for another",
            request_id,
            address,
            error.code().name,
            error.details(),
        )
        return True

    async def _select(
        self, model: str, excluded: Sequence[str], deadline: Deadline, metadata: Metadata
    ) -> controller_pb2.SelectWorkerResponse:
        """A worker for `model`, waiting with backoff (within --select-timeout and the request's
        deadline) while the controller is unreachable or the fleet recovers."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.select_timeout
        backoff = Backoff(_SELECT_MIN_BACKOFF_S, _SELECT_MAX_BACKOFF_S)
        while True:
            budget = deadline.within(max(give_up - loop.time(), 0.0))
            try:
                selection = await self.controller.select_worker(
                    model, exclude=excluded, timeout=budget, metadata=metadata
                )
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if code == grpc.StatusCode.UNAUTHENTICATED:
                    raise _auth_failure(error, self.controller.address) from None
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    deadline.remaining()  # raises if it is the request's own deadline
                    raise UnavailableError(
                        f"the controller did not offer a worker within "
                        f"{self.select_timeout:g} s; retry shortly"
                    ) from None
                recovering = code == grpc.StatusCode.UNAVAILABLE or (
                    code == grpc.StatusCode.NOT_FOUND and model in self._known_models
                )
                if not recovering or loop.time() + backoff.delay >= give_up:
                    raise
                logger.debug(
                    "no worker for %s yet (%s); asking again in %.2f s",
                    model,
                    code.name,
                    backoff.delay,
                )
                await asyncio.sleep(deadline.within(backoff.step()))
                continue
            self._known_models.add(model)
            return selection

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        """Count a call in flight; refuse it with OverloadedError (429) beyond the bound."""
        if self._in_flight >= self.max_concurrent_calls:
            raise OverloadedError(
                f"the gateway is at its limit of {self.max_concurrent_calls} calls in flight; "
                "retry later"
            )
        self._in_flight += 1
        try:
            yield
        finally:
            self._in_flight -= 1

    async def close(self) -> None:
        await asyncio.gather(self.controller.close(), self.workers.close())
