"""Entry point of a model worker: `chatfleet worker` loads models and serves WorkerService.

Start-up: the gRPC server (health NOT_SERVING), then the engines, then SERVING and registration
with the controller. Shutdown: NOT_SERVING, deregister, refuse new work, drain, stop the engines.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chatfleet.v1 import worker_pb2, worker_pb2_grpc
from services.common.entrypoint import ServiceFailedError, run_service
from services.common.grpc_server import GrpcServer, create_server
from services.common.metrics_server import MetricsServer, start_metrics_server
from services.common.signals import stop_event
from services.worker import convert
from services.worker.config import WorkerConfig, add_arguments
from services.worker.engine.factory import create_engine
from services.worker.engine.interface import Engine
from services.worker.engine_process.replicas import create_process_engines
from services.worker.metrics import worker_metrics_registry
from services.worker.registration import ControllerLink
from services.worker.servicer import ModelRegistry, WorkerServicer

logger = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name


@dataclass
class Worker:
    """A started worker: its server, models, servicer and (unless standalone) controller link."""

    config: WorkerConfig
    grpc: GrpcServer
    models: ModelRegistry
    servicer: WorkerServicer
    address: str
    link: ControllerLink | None = None
    metrics: MetricsServer | None = None
    _stopped: bool = False

    @property
    def port(self) -> int:
        return self.grpc.port

    @classmethod
    async def start(
        cls, config: WorkerConfig, *, engines: Sequence[Engine] | None = None
    ) -> Worker:
        """Listen, load the engines (built from the config unless given), go SERVING, register."""
        if engines is None:
            engines = create_engines(config)
        models = ModelRegistry(
            engines,
            tool_call_parser=config.tool_call_parser,
            reasoning_parser=config.reasoning_parser,
        )
        servicer = WorkerServicer(models, seed=config.seed)
        server = create_server(config.host, config.port, [SERVICE_NAME], security=config.security)
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server.server)
        await server.start()  # NOT_SERVING until the models are loaded
        logger.info(
            "worker listening on %s:%d%s (loading models)",
            config.host,
            server.port,
            config.security.describe(),
        )
        metrics = None
        try:
            registry = worker_metrics_registry(models.engines)
            metrics = await start_metrics_server(registry, config.host, config.metrics_port)
            await models.start()
        except BaseException:
            # Loading failed or was cancelled by a signal: release what exists, then report it.
            await server.server.stop(None)
            if metrics is not None:
                await metrics.stop()
            await models.stop()
            raise
        await server.set_serving(True)
        worker = cls(
            config=config,
            grpc=server,
            models=models,
            servicer=servicer,
            address=config.advertised_address(server.port),
            metrics=metrics,
        )
        if not config.no_register:
            worker.link = ControllerLink(
                controller_address=config.controller_address,
                worker_address=worker.address,
                models=lambda: [convert.to_model_info(d) for d in models.descriptions()],
                load=lambda: convert.to_load(models.load()),
                heartbeat_interval=config.heartbeat_interval,
                security=config.security,
            )
            await worker.link.start()
        logger.info("worker %s is serving", worker.address)
        return worker

    async def stop(self) -> None:
        """NOT_SERVING, deregister, refuse new work, let calls in flight finish within the grace
        period (then cancel them), stop the engines. Does nothing the second time."""
        if self._stopped:
            return
        self._stopped = True
        await self.grpc.health.enter_graceful_shutdown()
        if self.link is not None:
            await self.link.stop()
        self.servicer.start_draining()
        if self.servicer.in_flight:
            logger.info("waiting for %d calls in flight to finish", self.servicer.in_flight)
        drained = asyncio.gather(self.servicer.wait_idle(), self.models.drain())
        try:
            await asyncio.wait_for(drained, self.config.shutdown_grace)
        except asyncio.TimeoutError:
            if self.servicer.in_flight:
                logger.warning(
                    "%d calls still running after %.1fs; cancelling them",
                    self.servicer.in_flight,
                    self.config.shutdown_grace,
                )
        # Our own calls are done; what remains are health watches and reflection streams.
        await self.grpc.server.stop(0)
        await self.models.stop()
        if self.metrics is not None:
            await self.metrics.stop()
        logger.info("worker stopped")


def create_engines(config: WorkerConfig) -> list[Engine]:
    """The configured models' engines: in a child process unless --no-engine-process."""
    options = config.engine_options()
    if config.engine_process:
        return list(create_process_engines(config.models, options, config.engine_replicas))
    return [create_engine(spec, options) for spec in config.models]


async def serve(
    config: WorkerConfig,
    *,
    ready: asyncio.Event | None = None,
    engines: Sequence[Engine] | None = None,
) -> None:
    """Run a worker until cancelled or until SIGINT/SIGTERM (also while loading), then stop
    gracefully. `ready` is set once it serves and has tried to register."""
    with stop_event() as stop:
        stopping = asyncio.ensure_future(stop.wait())
        try:
            worker = await _start_unless_stopped(config, engines, stopping)
            if worker is None:
                return
            failed = asyncio.ensure_future(_first_failure(worker.models.engines))
            try:
                if ready is not None:
                    ready.set()
                await asyncio.wait({stopping, failed}, return_when=asyncio.FIRST_COMPLETED)
                if failed.done():
                    raise ServiceFailedError(f"a model can no longer serve: {failed.result()}")
                logger.info("shutting down")
            finally:
                failed.cancel()
                await worker.stop()
        finally:
            stopping.cancel()


async def _first_failure(engines: Sequence[Engine]) -> str:
    """Why the first engine to fail failed; never returns while they all serve."""
    watches = [asyncio.ensure_future(engine.failure()) for engine in engines]
    try:
        done, _ = await asyncio.wait(watches, return_when=asyncio.FIRST_COMPLETED)
        return done.pop().result()
    finally:
        for watch in watches:
            watch.cancel()


async def _start_unless_stopped(
    config: WorkerConfig, engines: Sequence[Engine] | None, stopping: asyncio.Future[Any]
) -> Worker | None:
    """Start a worker; None when a stop signal arrives first (loading can take minutes)."""
    starting = asyncio.ensure_future(Worker.start(config, engines=engines))
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        await _abandon(starting)
        raise
    if starting.done():
        return starting.result()
    logger.info("stop requested while starting")
    await _abandon(starting)
    return None


async def _abandon(starting: asyncio.Future[Worker]) -> None:
    starting.cancel()
    try:
        worker = await starting
    except asyncio.CancelledError:
        return  # Worker.start released what it had
    await worker.stop()  # it finished starting just before the cancellation


def main(argv: list[str] | None = None) -> int:
    return run_service(
        argv,
        name="worker",
        description="Load models and serve generation, embeddings and tokenization over gRPC.",
        add_arguments=add_arguments,
        build_config=WorkerConfig.from_namespace,
        serve=serve,
    )


if __name__ == "__main__":
    sys.exit(main())
