"""The gateway's gRPC side: the controller client, a pool of worker channels, the calls using them.

A request asks the controller for a worker (SelectWorker), then calls that worker directly. A worker
that answers UNAVAILABLE before producing anything is excluded and another one is asked for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chatfleet.v1 import (
    common_pb2,
    controller_pb2,
    controller_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from services.common.grpc_server import insecure_channel

logger = logging.getLogger(__name__)

# /health answers quickly even when the controller hangs.
HEALTH_TIMEOUT_SECONDS = 2.0

Metadata = tuple[tuple[str, str], ...]


class Deadline:
    """The time left for one HTTP request, shared by every gRPC call made on its behalf."""

    def __init__(self, seconds: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._end = self._loop.time() + seconds

    def remaining(self) -> float:
        """Seconds left; raises DEADLINE_EXCEEDED as a gRPC error would when none are."""
        left = self._end - self._loop.time()
        if left <= 0:
            raise DeadlineExceededError()
        return left


class DeadlineExceededError(grpc.aio.AioRpcError):
    """The request's budget ran out between two gRPC calls."""

    def __init__(self) -> None:
        super().__init__(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details="Deadline Exceeded",
        )


class ControllerClient:
    """The controller's ControllerService and health service over one channel."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._channel = insecure_channel(address)
        self._stub = controller_pb2_grpc.ControllerServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def list_models(
        self, *, timeout: float, metadata: Metadata = ()
    ) -> list[common_pb2.ModelInfo]:
        response = await self._stub.ListModels(
            controller_pb2.ListModelsRequest(), timeout=timeout, metadata=metadata
        )
        return list(response.models)

    async def select_worker(
        self, model: str, *, exclude: Sequence[str], timeout: float, metadata: Metadata = ()
    ) -> controller_pb2.SelectWorkerResponse:
        request = controller_pb2.SelectWorkerRequest(model=model, exclude_addresses=exclude)
        response: controller_pb2.SelectWorkerResponse = await self._stub.SelectWorker(
            request, timeout=timeout, metadata=metadata
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

    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, worker_pb2_grpc.WorkerServiceStub] = {}

    def stub(self, address: str) -> worker_pb2_grpc.WorkerServiceStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = insecure_channel(address)
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
    controller to a worker, with the retry on unavailable workers."""

    def __init__(
        self, controller: ControllerClient, workers: WorkerPool, *, worker_retries: int
    ) -> None:
        self.controller = controller
        self.workers = workers
        self.worker_retries = worker_retries

    async def list_models(
        self, *, deadline: Deadline, metadata: Metadata = ()
    ) -> list[common_pb2.ModelInfo]:
        return await self.controller.list_models(timeout=deadline.remaining(), metadata=metadata)

    async def generate(
        self, request: worker_pb2.GenerateRequest, *, deadline: Deadline, metadata: Metadata = ()
    ) -> AsyncGenerator[worker_pb2.GenerateResponse, None]:
        """Stream a completion from a worker chosen by the controller.

        Closing the iterator, or cancelling the task reading it, cancels the gRPC call, and the
        worker frees the request's slot.
        """
        excluded: list[str] = []
        for attempt in range(self.worker_retries + 1):
            selection = await self.controller.select_worker(
                request.model, exclude=excluded, timeout=deadline.remaining(), metadata=metadata
            )
            routed = worker_pb2.GenerateRequest()
            routed.CopyFrom(request)
            routed.model = selection.model.name or request.model
            call = self.workers.stub(selection.address).Generate(
                routed, timeout=deadline.remaining(), metadata=metadata
            )
            produced = False
            try:
                async for response in call:
                    produced = True
                    yield response
                return
            except grpc.aio.AioRpcError as error:
                if (
                    error.code() != grpc.StatusCode.UNAVAILABLE
                    or produced
                    or attempt == self.worker_retries
                ):
                    raise
                logger.warning(
                    "request %s: worker %s unavailable (%s); asking for another",
                    request.request_id,
                    selection.address,
                    error.details(),
                )
                excluded.append(selection.address)
            finally:
                # A no-op once the call ended; otherwise the consumer stopped early.
                call.cancel()

    async def embed(
        self, request: worker_pb2.EmbedRequest, *, deadline: Deadline, metadata: Metadata = ()
    ) -> worker_pb2.EmbedResponse:
        excluded: list[str] = []
        for attempt in range(self.worker_retries + 1):
            selection = await self.controller.select_worker(
                request.model, exclude=excluded, timeout=deadline.remaining(), metadata=metadata
            )
            routed = worker_pb2.EmbedRequest()
            routed.CopyFrom(request)
            routed.model = selection.model.name or request.model
            try:
                response: worker_pb2.EmbedResponse = await self.workers.stub(
                    selection.address
                ).Embed(routed, timeout=deadline.remaining(), metadata=metadata)
                return response
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == self.worker_retries:
                    raise
                logger.warning(
                    "request %s: worker %s unavailable (%s); asking for another",
                    request.request_id,
                    selection.address,
                    error.details(),
                )
                excluded.append(selection.address)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def close(self) -> None:
        await asyncio.gather(self.controller.close(), self.workers.close())
