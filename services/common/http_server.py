"""An ASGI app served by uvicorn on the service's own event loop, on a socket bound up front: port 0
yields a real port and a busy port fails with OSError before anything starts. Signals stay with
the service, which stops the server itself."""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
from collections.abc import Iterator
from typing import Any, Literal

import uvicorn


class _UvicornServer(uvicorn.Server):
    """uvicorn that leaves signals to its owner and says when it accepts connections."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # The service handles SIGINT/SIGTERM; uvicorn's own handlers would re-raise them on exit.
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.listening.set()


class HttpServer:
    """Serves one ASGI app on host:port (bound when constructed) between start() and stop()."""

    def __init__(
        self,
        app: Any,
        *,
        host: str,
        port: int,
        shutdown_grace_seconds: float | None = None,
        lifespan: Literal["on", "off"] = "off",
        ssl_keyfile: str | None = None,
        ssl_certfile: str | None = None,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._socket = socket.create_server((host, port), family=family)
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        grace = None if shutdown_grace_seconds is None else math.ceil(shutdown_grace_seconds)
        self._server = _UvicornServer(
            uvicorn.Config(
                app,
                host=host,
                port=self.port,
                lifespan=lifespan,
                log_config=None,
                access_log=False,
                ws="none",
                timeout_graceful_shutdown=grace,
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
        """Run the app's lifespan (when on) and start accepting connections."""
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
        lifespan's shutdown (when on). Closes the socket of a server never started."""
        self._server.should_exit = True
        if self._task is None:
            self._socket.close()
        elif not self._task.done():
            await self._task
