"""Protection of the internal gRPC services: a shared token in call metadata and TLS (optionally
mutual), set by the same flags on every service, with server and channel helpers that apply them.

One set of flags per process serves both of its roles: a worker's certificate is the one it serves
with and, under mutual TLS, the one it presents to the controller. The token travels as
`authorization: Bearer <token>`; the health service stays open (load balancers and Kubernetes gRPC
probes cannot send metadata, and it tells nothing but SERVING / NOT_SERVING).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health

from services.common.config import FlagParser

TOKEN_METADATA_KEY = "authorization"
# Methods callable without the token: the whole grpc.health.v1.Health service.
OPEN_METHOD_PREFIXES = (f"/{health.SERVICE_NAME}/",)


@dataclass(frozen=True)
class GrpcSecurity:
    """How a process protects its gRPC server and authenticates to the servers it calls.

    - token: the shared secret every call carries and every server requires (None: no token).
    - tls_cert/tls_key: PEM files; a server serves TLS with them, a client presents them when the
      server asks for a client certificate (mutual TLS).
    - tls_ca: PEM file of the CA that signed the peers' certificates: a client verifies servers
      with it, a server verifies clients with it.
    - tls_client_auth: a server refuses clients without a certificate signed by tls_ca.
    Clients use TLS when tls_ca or tls_cert is set; servers when tls_cert is set.
    """

    token: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    tls_client_auth: bool = False

    def __post_init__(self) -> None:
        if self.token is not None and (not self.token or self.token.strip() != self.token):
            raise ValueError("--grpc-token must be non-empty and carry no surrounding spaces")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_auth and not (self.tls_cert and self.tls_ca):
            raise ValueError("--tls-client-auth needs --tls-cert, --tls-key and --tls-ca")
        for flag, path in (
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--tls-ca", self.tls_ca),
        ):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{flag}: no such file: {path}")

    @property
    def client_tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    @property
    def server_tls(self) -> bool:
        return bool(self.tls_cert)

    @classmethod
    def from_namespace(cls, ns: Any) -> GrpcSecurity:
        """From the flags of `add_security_flags` (ValueError says what is wrong)."""
        return cls(
            token=ns.grpc_token or None,
            tls_cert=ns.tls_cert or None,
            tls_key=ns.tls_key or None,
            tls_ca=ns.tls_ca or None,
            tls_client_auth=bool(getattr(ns, "tls_client_auth", False)),
        )

    def __repr__(self) -> str:
        # Configs get logged and printed in errors: never the token itself.
        token = "set" if self.token else None
        return (
            f"GrpcSecurity(token={token}, tls_cert={self.tls_cert!r}, tls_key={self.tls_key!r}, "
            f"tls_ca={self.tls_ca!r}, tls_client_auth={self.tls_client_auth})"
        )

    def describe(self) -> str:
        """How a server is protected, for its start-up log line: "" or " (TLS, token)"."""
        parts = []
        if self.server_tls:
            parts.append("mutual TLS" if self.tls_client_auth else "TLS")
        if self.token:
            parts.append("token")
        return f" ({', '.join(parts)})" if parts else ""

    # -- server side ------------------------------------------------------------------------

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenAuthInterceptor(self.token)] if self.token else []

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials for a server, None when it serves plaintext."""
        if not self.server_tls:
            return None
        assert self.tls_cert is not None and self.tls_key is not None
        return grpc.ssl_server_credentials(
            [(_read(self.tls_key), _read(self.tls_cert))],
            root_certificates=_read(self.tls_ca) if self.tls_ca else None,
            require_client_auth=self.tls_client_auth,
        )

    # -- client side ------------------------------------------------------------------------

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        return list(_token_client_interceptors(self.token)) if self.token else []

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """TLS credentials for a channel, None for plaintext."""
        if not self.client_tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca) if self.tls_ca else None,
            private_key=_read(self.tls_key) if self.tls_key else None,
            certificate_chain=_read(self.tls_cert) if self.tls_cert else None,
        )


NO_SECURITY = GrpcSecurity()


def _read(path: str | None) -> bytes:
    assert path is not None
    return Path(path).read_bytes()


def add_security_flags(flags: FlagParser, *, server: bool = True) -> None:
    """--grpc-token and --tls-* flags (env CHATFLEET_GRPC_TOKEN, CHATFLEET_TLS_*: one environment
    configures every service alike). `server=False` leaves out --tls-client-auth."""
    flags.add(
        "--grpc-token",
        default=None,
        help="shared secret of the internal gRPC services: servers refuse calls without it "
        "(UNAUTHENTICATED; the health service stays open), clients send it",
    )
    flags.add(
        "--tls-cert",
        default=None,
        help="PEM certificate: a gRPC server serves TLS with it; a client presents it to servers "
        "that require client certificates",
    )
    flags.add("--tls-key", default=None, help="PEM private key of --tls-cert")
    flags.add(
        "--tls-ca",
        default=None,
        help="PEM CA certificate that signed the peers' certificates: clients verify servers "
        "with it (and use TLS), servers verify client certificates with it",
    )
    if server:
        flags.add_bool(
            "--tls-client-auth",
            default=False,
            help="mutual TLS: refuse gRPC clients without a certificate signed by --tls-ca",
        )


def security_from_environ(environ: Mapping[str, str]) -> GrpcSecurity:
    """The client side of the security settings from CHATFLEET_* variables, for command-line
    tools that take no security flags of their own."""
    return GrpcSecurity(
        token=environ.get("CHATFLEET_GRPC_TOKEN") or None,
        tls_cert=environ.get("CHATFLEET_TLS_CERT") or None,
        tls_key=environ.get("CHATFLEET_TLS_KEY") or None,
        tls_ca=environ.get("CHATFLEET_TLS_CA") or None,
    )


# --- the token ------------------------------------------------------------------------------------


def token_matches(metadata: Any, token: str) -> bool:
    """True when the call metadata carries `authorization: Bearer <token>` (constant time)."""
    given = ""
    for key, value in metadata or ():
        if key == TOKEN_METADATA_KEY:
            given = value if isinstance(value, str) else value.decode("latin-1")
            break
    scheme, _, presented = given.partition(" ")
    if scheme.lower() != "bearer":
        presented = ""
    return hmac.compare_digest(presented.strip().encode(), token.encode())


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without the shared token with UNAUTHENTICATED (the health service is
    open). It runs first, so an unauthenticated caller reaches no servicer code."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        if token_matches(handler_call_details.invocation_metadata, self._token):
            return handler
        return _refusing(handler)


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong gRPC token")


async def _refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong gRPC token")
    yield  # pragma: no cover  (makes this an async generator, as streaming handlers are)


def _refusing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that aborts with UNAUTHENTICATED."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    behavior = _refuse_stream if handler.response_streaming else _refuse
    return make(
        behavior,  # type: ignore[arg-type]
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata[TOKEN_METADATA_KEY] = f"Bearer {token}"
    return grpc.aio.ClientCallDetails(
        method=details.method,
        timeout=details.timeout,
        metadata=metadata,
        credentials=details.credentials,
        wait_for_ready=details.wait_for_ready,
    )


class _TokenUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_token(client_call_details, self._token), request)


class _TokenUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return await continuation(_with_token(client_call_details, self._token), request)


class _TokenStreamUnary(grpc.aio.StreamUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_stream_unary(
        self,
        continuation: Any,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await continuation(_with_token(client_call_details, self._token), request_iterator)


class _TokenStreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_stream_stream(
        self,
        continuation: Any,
        client_call_details: grpc.aio.ClientCallDetails,
        request_iterator: Any,
    ) -> Any:
        return await continuation(_with_token(client_call_details, self._token), request_iterator)


def _token_client_interceptors(token: str) -> tuple[grpc.aio.ClientInterceptor, ...]:
    return (
        _TokenUnaryUnary(token),
        _TokenUnaryStream(token),
        _TokenStreamUnary(token),
        _TokenStreamStream(token),
    )
