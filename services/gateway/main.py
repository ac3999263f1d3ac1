"""The gateway's entry point: `chatfleet gateway` runs uvicorn in asyncio until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
from collections.abc import Iterator
from typing import Any

import uvicorn
from fastapi import FastAPI

from services.common.entrypoint import run_service
from services.common.signals import stop_event
from services.gateway.app import create_app
from services.gateway.config import GatewayConfig, add_arguments

logger = logging.getLogger(__name__)


class _UvicornServer(uvicorn.Server):
    """uvicorn that leaves signals to its owner and says when it accepts connections."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # serve() handles SIGINT/SIGTERM; uvicorn's own handlers would re-raise them on exit.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.listening.set()


class HttpServer:
    """An ASGI app served by uvicorn on a socket bound up front, so port 0 yields a real port
    and a busy port fails with OSError before anything starts."""

    def __init__(
        self,
        app: FastAPI,
        *,
        host: str,
        port: int,
        shutdown_grace_seconds: float,
        ssl_keyfile: str | None = None,
        ssl_certfile: str | None = None,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family)
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        self._server = _UvicornServer(
            uvicorn.Config(
                app,
                host=host,
                port=self.port,
                lifespan="on",
                log_config=None,
                access_log=False,
                ws="none",
                timeout_graceful_shutdown=math.ceil(shutdown_grace_seconds),
                # HTTPS when both are given (uvicorn loads them when the server starts).
                ssl_keyfile=ssl_keyfile,
                ssl_certfile=ssl_certfile,
            )
        )
        self.scheme = "https" if ssl_keyfile and ssl_certfile else "http"
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    async def start(self) -> None:
        """Run the app's lifespan and start accepting connections."""
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        listening = asyncio.ensure_future(self._server.listening.wait())
        try:
            await asyncio.wait({self._task, listening}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            listening.cancel()
        if self._task.done():
            self._task.result()  # raises what stopped it
            raise RuntimeError("the HTTP server stopped while starting")

    async def wait_stopped(self) -> None:
        """Wait until the server stops on its own; cancelling the wait leaves the server running."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish within the grace period, run the
        lifespan's shutdown (closing the gRPC clients)."""
        self._server.should_exit = True
        if self._task is None:
            self._socket.close()
        elif not self._task.done():
            await self._task


async def serve(config: GatewayConfig, *, ready: asyncio.Event | None = None) -> None:
    """Serve until cancelled or SIGINT/SIGTERM, then stop gracefully; set `ready` when listening."""
    server = HttpServer(
        create_app(config),
        host=config.host,
        port=config.port,
        shutdown_grace_seconds=config.shutdown_grace_seconds,
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
