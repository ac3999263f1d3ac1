"""The gateway's entry point: `chatfleet gateway` runs uvicorn in asyncio until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from services.common.entrypoint import run_service
from services.common.http_server import HttpServer
from services.common.signals import stop_event
from services.gateway.app import create_app
from services.gateway.config import GatewayConfig, add_arguments

logger = logging.getLogger(__name__)


async def serve(config: GatewayConfig, *, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled or SIGINT/SIGTERM, then stop gracefully; set `ready` when listening."""
    server = HttpServer(
        create_app(config),
        host=config.host,
        port=config.port,
        shutdown_grace_seconds=config.shutdown_grace_seconds,
        lifespan="on",  # opens the upstream gRPC clients, and closes them on stop()
        ssl_keyfile=config.ssl_keyfile if config.ssl else None,
        ssl_certfile=config.ssl_certfile if config.ssl else None,
    )
    waiters: list[asyncio.Future[Any]] = []
    try:
        with stop_event() as stop:
            await server.start()
            logger.info("gateway listening on %s", server.url)
            if ready is not None:
                ready.set()
            stopped = asyncio.ensure_future(server.wait_stopped())
            waiters = [stopped, asyncio.ensure_future(stop.wait())]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if stopped.done():
                stopped.result()  # raises what stopped the server
                raise RuntimeError("the HTTP server stopped on its own")
            logger.info("shutting down")
    finally:
        for waiter in waiters:
            waiter.cancel()
        await server.stop()
        logger.info("gateway stopped")


def main(argv: list[str] | None = None) -> int:
    return run_service(
        argv,
        name="gateway",
        description="OpenAI-compatible HTTP API in front of the chatfleet controller and workers.",
        add_arguments=add_arguments,
        build_config=GatewayConfig.from_namespace,
        serve=serve,
    )


if __name__ == "__main__":
    raise SystemExit(main())
