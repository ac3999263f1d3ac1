"""The Prometheus endpoint of the gRPC services (controller, worker): prometheus_client's ASGI app
answering `GET /metrics` from a CollectorRegistry, and its `--metrics-port` flag.

It is served by uvicorn on the service's event loop rather than in prometheus_client's server
thread, so the collectors read the registry and engines from the thread that owns them, without
locks.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, make_asgi_app

from services.common.config import FlagParser
from services.common.http_server import HttpServer

logger = logging.getLogger(__name__)

_OFF = frozenset({"", "off", "none", "disabled"})
# In-flight scrapes get this long to finish when the service stops.
_SHUTDOWN_GRACE_S = 5.0

_Message = MutableMapping[str, Any]
_Send = Callable[[_Message], Awaitable[None]]
_Receive = Callable[[], Awaitable[_Message]]


def metrics_port(text: str) -> int | None:
    """A --metrics-port value: a port, 0 for a free one, or off/none/a negative number (None)."""
    if text.strip().lower() in _OFF:
        return None
    port = int(text)
    if port < 0:
        return None
    check_metrics_port(port)
    return port


def check_metrics_port(port: int | None) -> None:
    """ValueError unless `port` is None (off) or in 0..65535."""
    if port is not None and not 0 <= port <= 65535:
        raise ValueError(f"--metrics-port must be in 0..65535 or off, got {port}")


def add_metrics_port_flag(flags: FlagParser, *, env: str, default: int | None = None) -> None:
    """`--metrics-port` of a gRPC service (env `env`), off by default."""
    flags.add(
        "--metrics-port",
        default=default,
        type=metrics_port,
        env=env,
        metavar="PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (HOST: the service's --host); "
        "0 picks a free port (logged), off or a negative number disables it",
    )


class MetricsServer:
    """Serves one registry at /metrics on host:port until stopped."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.requested_port = port
        self.port = port
        self._server: HttpServer | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def start(self) -> None:
        """Bind (OSError when the port is taken) and start answering."""
        server = HttpServer(
            _MetricsApp(self.registry),
            host=self.host,
            port=self.requested_port,
            shutdown_grace_seconds=_SHUTDOWN_GRACE_S,
        )
        self.port = server.port
        try:
            await server.start()
        except BaseException:
            await server.stop()
            raise
        self._server = server
        logger.info("metrics listening on %s", self.url)

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
            self._server = None


class _MetricsApp:
    """prometheus_client's ASGI app at /metrics, for GET and HEAD only, its answers given a
    Content-Length (which HEAD needs, having no body to count)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # Uncompressed: the endpoint has always answered plain text, whatever Accept-Encoding says.
        self._prometheus = make_asgi_app(registry, disable_compression=True)

    async def __call__(self, scope: _Message, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] != "/metrics":
            await _answer(send, 404, b"try /metrics\n", [(b"content-type", b"text/plain")])
        elif scope["method"] not in ("GET", "HEAD"):
            await _answer(send, 405, b"", [(b"allow", b"GET, HEAD")])
        else:
            await self._prometheus(scope, receive, _sized(send))


async def _answer(
    send: _Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    length = (b"content-length", str(len(body)).encode())
    await send({"type": "http.response.start", "status": status, "headers": [*headers, length]})
    await send({"type": "http.response.body", "body": body})


def _sized(send: _Send) -> _Send:
    """`send` with the start of the answer held back until its first body message, then sent
    with a Content-Length when that message is the whole body (as prometheus_client sends it)."""
    start: _Message | None = None

    async def sized(message: _Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if start is not None and message["type"] == "http.response.body":
            headers = list(start.get("headers", ()))
            if not message.get("more_body", False):
                headers.append((b"content-length", str(len(message.get("body", b""))).encode()))
            await send({**start, "headers": headers})
            start = None
        await send(message)

    return sized


async def start_metrics_server(
    registry: CollectorRegistry, host: str, port: int | None
) -> MetricsServer | None:
    """A started MetricsServer for `registry` on host:port; None when port is None (off)."""
    if port is None:
        return None
    server = MetricsServer(registry, host, port)
    await server.start()
    return server
