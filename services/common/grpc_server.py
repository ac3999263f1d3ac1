"""Builds a grpc.aio server with health checking, reflection and chatfleet's error mapping, and the
channels that call such servers; both apply a GrpcSecurity (token, TLS) when given one."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.grpc_errors import ErrorMappingInterceptor
from services.common.grpc_request_id import RequestIdInterceptor
from services.common.security import NO_SECURITY, GrpcSecurity

# Large enough for embedding batches and long prompts given as token ids.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),
    # Accept the keepalive pings of CHANNEL_OPTIONS: by default a server answers pings more
    # frequent than every 5 minutes on an idle stream (a health Watch) with GOAWAY too_many_pings.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
]

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Notice a dead peer quickly even when no call is under way. A process that dies resets its
    # connections at once (calls fail with UNAVAILABLE within milliseconds); keepalive is for a
    # host that goes silent: its calls fail within keepalive_time + keepalive_timeout (~15 s).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Keep pinging while a stream carries no data (the default stops after 2 pings).
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


@dataclass
class GrpcServer:
    """A server, the port it is bound to and its health servicer."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]

    async def start(self) -> None:
        """Start accepting calls, reporting NOT_SERVING for "" and every service until
        `set_serving(True)`: the stock health servicer would report "" SERVING from the start."""
        await self.set_serving(False)
        await self.server.start()

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING or NOT_SERVING for the overall server and each of its services."""
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self.service_names):
            await self.health.set(name, status)


def create_server(
    host: str, port: int, service_names: Iterable[str], *, security: GrpcSecurity = NO_SECURITY
) -> GrpcServer:
    """Create a server bound to host:port (0 picks a free port) with health (NOT_SERVING until
    `set_serving(True)`) and reflection, requiring `security`'s token and serving its TLS.
    Add the servicers to `.server`, then `await .start()`."""
    names = tuple(service_names)
    # The request id is bound outermost (every log line of the call carries it; it grants
    # nothing), then the token is checked: an unauthenticated call reaches nothing else.
    interceptors = [
        RequestIdInterceptor(),
        *security.server_interceptors(),
        ErrorMappingInterceptor(),
    ]
    server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    credentials = security.server_credentials()
    if credentials is None:
        bound = server.add_insecure_port(f"{host}:{port}")
    else:
        bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    return GrpcServer(server=server, port=bound, health=health_servicer, service_names=names)


def open_channel(
    address: str,
    security: GrpcSecurity = NO_SECURITY,
    *,
    max_reconnect_backoff_ms: int | None = None,
) -> grpc.aio.Channel:
    """An async channel with chatfleet's message size and keepalive settings, sending
    `security`'s token and speaking TLS when it says so; `max_reconnect_backoff_ms` overrides the
    longest wait between two connection attempts."""
    options = CHANNEL_OPTIONS
    if max_reconnect_backoff_ms is not None:
        options = [
            *(option for option in CHANNEL_OPTIONS if option[0] != "grpc.max_reconnect_backoff_ms"),
            ("grpc.max_reconnect_backoff_ms", max_reconnect_backoff_ms),
        ]
    interceptors = security.client_interceptors() or None
    credentials = security.channel_credentials()
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)


def insecure_channel(
    address: str, *, max_reconnect_backoff_ms: int | None = None
) -> grpc.aio.Channel:
    """A plaintext channel without token (`open_channel` with no security)."""
    return open_channel(address, max_reconnect_backoff_ms=max_reconnect_backoff_ms)
