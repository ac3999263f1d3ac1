"""Entry point of the controller: `chatfleet controller` runs the gRPC ControllerService."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from dataclasses import dataclass

from chatfleet.v1 import controller_pb2, controller_pb2_grpc
from services.common.entrypoint import run_service
from services.common.grpc_server import GrpcServer, create_server, open_channel
from services.common.metrics_server import MetricsServer, start_metrics_server
from services.common.signals import stop_event
from services.controller.config import ControllerConfig, add_arguments
from services.controller.dispatcher import Dispatcher
from services.controller.health_watch import HealthWatcher
from services.controller.metrics import controller_metrics_registry
from services.controller.registry import WorkerRegistry
from services.controller.servicer import ControllerServicer

logger = logging.getLogger(__name__)

SERVICE_NAME = controller_pb2.DESCRIPTOR.services_by_name["ControllerService"].full_name


@dataclass
class Controller:
    """A started controller: its server, registry and health watcher."""

    config: ControllerConfig
    grpc: GrpcServer
    registry: WorkerRegistry
    watcher: HealthWatcher
    metrics: MetricsServer | None = None
    _stopped: bool = False

    @property
    def port(self) -> int:
        return self.grpc.port

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.port}"

    @classmethod
    async def start(cls, config: ControllerConfig) -> Controller:
        """Build and start the controller; it reports SERVING once it listens."""
        registry = WorkerRegistry()
        watcher = HealthWatcher(
            registry,
            channel_factory=functools.partial(open_channel, security=config.security),
            forget_after=config.forget_after,
        )
        servicer = ControllerServicer(
            registry,
            watcher,
            Dispatcher(registry, config.dispatch_method),
            heartbeat_interval_seconds=config.heartbeat_interval,
        )
        server = create_server(config.host, config.port, [SERVICE_NAME], security=config.security)
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(servicer, server.server)
        metrics = await start_metrics_server(
            controller_metrics_registry(registry), config.host, config.metrics_port
        )
        await server.start()
        await server.set_serving(True)
        logger.info(
            "controller listening on %s:%d%s",
            config.host,
            server.port,
            config.security.describe(),
        )
        return cls(config=config, grpc=server, registry=registry, watcher=watcher, metrics=metrics)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, end the WatchWorkers streams and close the health streams, then let
        in-flight calls finish within `grace`.
        Does nothing the second time."""
        if self._stopped:
            return
        self._stopped = True
        await self.grpc.health.enter_graceful_shutdown()
        self.registry.close()  # ends the WatchWorkers streams
        await self.watcher.close()
        await self.grpc.server.stop(self.config.shutdown_grace if grace is None else grace)
        if self.metrics is not None:
            await self.metrics.stop()
        logger.info("controller stopped")


async def serve(config: ControllerConfig, *, ready: asyncio.Event | None = None) -> None:
    """Run the controller until cancelled or until SIGINT/SIGTERM, then stop gracefully."""
    controller = await Controller.start(config)
    try:
        with stop_event() as stop:
            if ready is not None:
                ready.set()
            await stop.wait()
            logger.info("shutting down")
    finally:
        await controller.stop()


def main(argv: list[str] | None = None) -> int:
    return run_service(
        argv,
        name="controller",
        description="Keep the registry of workers and pick a worker for each request.",
        add_arguments=add_arguments,
        build_config=ControllerConfig.from_namespace,
        serve=serve,
    )


if __name__ == "__main__":
    sys.exit(main())
