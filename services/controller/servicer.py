"""ControllerService: worker registration, load reports, model listing and worker selection."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from chatfleet.v1 import common_pb2, controller_pb2, controller_pb2_grpc
from services.common.errors import InvalidRequestError
from services.controller.dispatcher import Dispatcher, DispatchMethod
from services.controller.health_watch import HealthWatcher
from services.controller.registry import (
    Load,
    ModelInfo,
    ModelKind,
    WorkerRecord,
    WorkerRegistry,
    WorkerState,
)

logger = logging.getLogger(__name__)

# A registering worker is usually SERVING already: wait this long for its first health report so
# that it can be selected as soon as RegisterWorker returns.
_FIRST_REPORT_TIMEOUT_S = 2.0

_KINDS = {
    common_pb2.MODEL_KIND_GENERATE: ModelKind.GENERATE,
    common_pb2.MODEL_KIND_EMBED: ModelKind.EMBED,
}
_KIND_PROTOS = {kind: proto for proto, kind in _KINDS.items()}
_STATE_PROTOS = {
    WorkerState.UNKNOWN: controller_pb2.WORKER_STATE_UNSPECIFIED,
    WorkerState.SERVING: controller_pb2.WORKER_STATE_SERVING,
    WorkerState.NOT_SERVING: controller_pb2.WORKER_STATE_NOT_SERVING,
    WorkerState.UNREACHABLE: controller_pb2.WORKER_STATE_UNREACHABLE,
}
_METHODS = {
    controller_pb2.DISPATCH_METHOD_SHORTEST_QUEUE: DispatchMethod.SHORTEST_QUEUE,
    controller_pb2.DISPATCH_METHOD_LOTTERY: DispatchMethod.LOTTERY,
}


class ControllerServicer(controller_pb2_grpc.ControllerServiceServicer):
    """Converts protobuf to the registry's types and back; liveness comes from the HealthWatcher."""

    def __init__(
        self,
        registry: WorkerRegistry,
        watcher: HealthWatcher,
        dispatcher: Dispatcher,
        *,
        heartbeat_interval_seconds: int,
    ) -> None:
        self._registry = registry
        self._watcher = watcher
        self._dispatcher = dispatcher
        self._heartbeat_interval_seconds = heartbeat_interval_seconds

    async def RegisterWorker(
        self, request: controller_pb2.RegisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> controller_pb2.RegisterWorkerResponse:
        address = _required(request.address, "address")
        if not request.models:
            raise InvalidRequestError("a worker must serve at least one model", param="models")
        models = [_model_from_proto(info) for info in request.models]
        is_new = self._registry.register(address, models, _load_from_proto(request.load))
        names = ", ".join(name for info in models for name in info.names)
        verb = "registered" if is_new else "refreshed"
        logger.info("worker %s %s, serving %s", address, verb, names)
        if self._registry.state(address) is WorkerState.UNREACHABLE:
            # A worker back from a crash: what its broken stream said no longer holds.
            self._registry.set_state(address, WorkerState.UNKNOWN)
        self._watcher.watch(address)
        if self._registry.state(address) is WorkerState.UNKNOWN:
            await self._watcher.wait_for_state(
                address,
                {WorkerState.SERVING, WorkerState.NOT_SERVING, WorkerState.UNREACHABLE},
                _FIRST_REPORT_TIMEOUT_S,
            )
        return controller_pb2.RegisterWorkerResponse(
            heartbeat_interval_seconds=self._heartbeat_interval_seconds
        )

    async def DeregisterWorker(
        self, request: controller_pb2.DeregisterWorkerRequest, context: grpc.aio.ServicerContext
    ) -> controller_pb2.DeregisterWorkerResponse:
        address = _required(request.address, "address")
        existed = self._registry.deregister(address)
        await self._watcher.unwatch(address)
        if existed:
            logger.info("worker %s deregistered", address)
        return controller_pb2.DeregisterWorkerResponse(existed=existed)

    async def Heartbeat(
        self, request: controller_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> controller_pb2.HeartbeatResponse:
        address = _required(request.address, "address")
        known = self._registry.update_load(address, _load_from_proto(request.load))
        if not known:
            logger.info("heartbeat from unknown worker %s: asking it to register", address)
        return controller_pb2.HeartbeatResponse(reregister=not known)

    async def ListModels(
        self, request: controller_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> controller_pb2.ListModelsResponse:
        models = [_model_to_proto(info) for info in self._registry.served_models()]
        return controller_pb2.ListModelsResponse(models=models)

    async def ListWorkers(
        self, request: controller_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> controller_pb2.ListWorkersResponse:
        workers = [_worker_to_proto(record) for record in self._registry.workers()]
        return controller_pb2.ListWorkersResponse(workers=workers)

    async def WatchWorkers(
        self, request: controller_pb2.WatchWorkersRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[controller_pb2.WatchWorkersResponse]:
        async with contextlib.aclosing(self._registry.changes()) as changes:
            async for _ in changes:
                yield controller_pb2.WatchWorkersResponse(
                    workers=[_worker_to_proto(record) for record in self._registry.workers()],
                    models=[_model_to_proto(info) for info in self._registry.served_models()],
                )

    async def SelectWorker(
        self, request: controller_pb2.SelectWorkerRequest, context: grpc.aio.ServicerContext
    ) -> controller_pb2.SelectWorkerResponse:
        model = _required(request.model, "model")
        method = _METHODS.get(request.dispatch_method)
        if method is None and request.dispatch_method != controller_pb2.DISPATCH_METHOD_UNSPECIFIED:
            raise InvalidRequestError(
                f"unknown dispatch method {request.dispatch_method}", param="dispatch_method"
            )
        selection = self._dispatcher.select(
            model, method=method, exclude=frozenset(request.exclude_addresses)
        )
        # The record carries the caller's request id (x-request-id metadata).
        logger.debug("selected worker %s for %s", selection.address, model)
        return controller_pb2.SelectWorkerResponse(
            address=selection.address, model=_model_to_proto(selection.model)
        )


def _required(value: str, param: str) -> str:
    if not value.strip():
        raise InvalidRequestError(f"'{param}' is required", param=param)
    return value.strip()


def _model_from_proto(info: common_pb2.ModelInfo) -> ModelInfo:
    if not info.name.strip():
        raise InvalidRequestError("every model needs a name", param="models.name")
    if info.kind not in _KINDS:
        raise InvalidRequestError(f"model '{info.name}' has no kind", param="models.kind")
    return ModelInfo(
        name=info.name,
        kind=_KINDS[info.kind],
        context_length=info.context_length,
        supports_chat=info.supports_chat,
        supports_embeddings=info.supports_embeddings,
        aliases=tuple(alias for alias in info.aliases if alias.strip()),
        source=info.source,
    )


def _model_to_proto(info: ModelInfo) -> common_pb2.ModelInfo:
    return common_pb2.ModelInfo(
        name=info.name,
        kind=_KIND_PROTOS[info.kind],
        context_length=info.context_length,
        supports_chat=info.supports_chat,
        supports_embeddings=info.supports_embeddings,
        aliases=list(info.aliases),
        source=info.source,
    )


def _load_from_proto(load: common_pb2.Load) -> Load:
    return Load(running=load.running, waiting=load.waiting, capacity=load.capacity)


def _worker_to_proto(record: WorkerRecord) -> controller_pb2.WorkerStatus:
    return controller_pb2.WorkerStatus(
        address=record.address,
        models=[_model_to_proto(info) for info in record.models],
        state=_STATE_PROTOS[record.state],
        load=common_pb2.Load(
            running=record.load.running,
            waiting=record.load.waiting,
            capacity=record.load.capacity,
        ),
    )
