"""The Prometheus endpoint of the gRPC services (controller, worker): a small asyncio HTTP server
answering `GET /metrics` from a CollectorRegistry, and its `--metrics-port` flag.

It runs on the service's event loop rather than in prometheus_client's server thread, so the
collectors read the registry and engines from the thread that owns them, without locks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from services.common.config import FlagParser

logger = logging.getLogger(__name__)

# A scraper that sends no complete request head within this long is dropped.
_READ_TIMEOUT_S = 10.0
_OFF = frozenset({"", "off", "none", "disabled"})


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
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def start(self) -> None:
        """Bind (OSError when the port is taken) and start answering."""
        self._server = await asyncio.start_server(self._handle, self.host, self.requested_port)
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("metrics listening on %s", self.url)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
            method, status, headers, body = self._answer(head)
            lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items())]
            lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
            writer.write("\r\n".join(lines).encode("latin-1"))
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # no complete request head in time (or an oversized one): no answer
        except ConnectionError:
            pass  # the scraper went away
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def _answer(self, head: bytes) -> tuple[str, str, dict[str, str], bytes]:
        """Method, status line, headers and body of the answer to a request head."""
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, _, rest = request_line.partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        if path != "/metrics":
            return method, "404 Not Found", {"Content-Type": "text/plain"}, b"try /metrics\n"
        if method not in ("GET", "HEAD"):
            return method, "405 Method Not Allowed", {"Allow": "GET, HEAD"}, b""
        accept = ""
        for line in header_lines:
            name, _, value = line.partition(":")
            if name.strip().lower() == "accept":
                accept = value.strip()
        encoder, content_type = choose_encoder(accept)
        body = encoder(self.registry)
        return method, "200 OK", {"Content-Type": content_type}, body


async def start_metrics_server(
    registry: CollectorRegistry, host: str, port: int | None
) -> MetricsServer | None:
    """A started MetricsServer for `registry` on host:port; None when port is None (off)."""
    if port is None:
        return None
    server = MetricsServer(registry, host, port)
    await server.start()
    return server
