"""The gateway's configuration: a frozen dataclass built from flags with CHATFLEET_* fallbacks."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.common.config import LOG_FORMATS, LOG_LEVELS, FlagParser, add_logging_flags, env_name
from services.common.fastchat_compat import host_port, parse_list
from services.common.security import GrpcSecurity, add_security_flags
from services.gateway.arena import default_arena_db
from services.leaderboard.store import InvalidStoreURLError, parse_store_url


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway needs to start; validated once by `from_namespace`."""

    host: str = "127.0.0.1"
    port: int = 8000
    controller_address: str = "127.0.0.1:21001"
    # Empty: no authentication. Otherwise every route but /health needs `Bearer <one of these>`.
    api_keys: tuple[str, ...] = ()
    # Deadlines by route, passed down as gRPC deadlines (timeout -> 504). A non-streamed
    # completion and the model routes get a budget for the whole request.
    request_timeout_seconds: float = 600.0
    embeddings_timeout_seconds: float = 60.0
    # A streamed completion must produce its first token within this (worker choice, retries,
    # queueing and prefill included); after that it runs for up to stream_timeout (0: no limit):
    # a long answer that keeps coming is never cut by a wall clock the client did not ask for.
    first_token_timeout_seconds: float = 120.0
    stream_timeout_seconds: float = 0.0
    # How long a request waits for the controller to answer and for a worker to be selectable
    # (the controller restarting, workers registering again) before it fails with 503.
    select_timeout_seconds: float = 10.0
    # Upstream calls (one per choice or prompt of a completion, one per embedding request) in
    # flight at once; beyond it new requests get 429 at once: the gateway's bounded queue.
    max_concurrent_calls: int = 1024
    # How many other workers to try when the chosen one answers UNAVAILABLE before producing output.
    worker_retries: int = 2
    # How long in-flight requests may take to finish once shutdown starts.
    shutdown_grace_seconds: float = 10.0
    # Larger request bodies get 413 before they are read in full.
    max_body_bytes: int = 16 * 1024 * 1024
    # Token and TLS of its calls to the controller and workers.
    security: GrpcSecurity = field(default_factory=GrpcSecurity)
    # CORS, so browser clients served from other origins (ChatGPT-Next-Web and the like) can call
    # the API. As in FastChat: any origin, method and header, without credentials; API keys, not
    # origins, are what protect the API. No origins turn CORS off.
    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False
    # HTTPS (FastChat's --ssl) with this PEM key and certificate.
    ssl: bool = False
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    log_level: str = "INFO"
    log_format: str = "text"
    # SQLite file of the web UI's arena votes (created on the first vote). The flag's default is
    # the user's data dir; this one (for configs built in code) is the working directory.
    arena_db: str = "chatfleet-arena.sqlite3"
    # Where battles, votes and MT-bench scores live, as a URL: sqlite:///PATH or
    # postgresql://... (shared by every replica). Unset: the SQLite file arena_db.
    leaderboard_url: str | None = None

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("--host must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        host, sep, port = self.controller_address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(
                f"--controller-address must look like HOST:PORT, got {self.controller_address!r}"
            )
        if any(not key or key.strip() != key for key in self.api_keys):
            raise ValueError("--api-keys entries must be non-empty and carry no surrounding spaces")
        for flag, seconds in (
            ("--request-timeout", self.request_timeout_seconds),
            ("--embeddings-timeout", self.embeddings_timeout_seconds),
            ("--first-token-timeout", self.first_token_timeout_seconds),
            ("--select-timeout", self.select_timeout_seconds),
        ):
            if not (seconds > 0 and math.isfinite(seconds)):
                raise ValueError(f"{flag} must be a positive number of seconds, got {seconds}")
        if not (self.stream_timeout_seconds >= 0 and math.isfinite(self.stream_timeout_seconds)):
            raise ValueError(
                f"--stream-timeout must be >= 0 seconds (0: no limit), "
                f"got {self.stream_timeout_seconds}"
            )
        if self.max_concurrent_calls < 1:
            raise ValueError(
                f"--max-concurrent-calls must be at least 1, got {self.max_concurrent_calls}"
            )
        if self.worker_retries < 0:
            raise ValueError(f"--worker-retries must be >= 0, got {self.worker_retries}")
        if not self.shutdown_grace_seconds >= 0:
            raise ValueError(
                f"--shutdown-grace must be >= 0 seconds, got {self.shutdown_grace_seconds}"
            )
        if self.max_body_bytes < 1:
            raise ValueError(f"--max-body-bytes must be >= 1, got {self.max_body_bytes}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")
        if self.ssl and not (self.ssl_keyfile and self.ssl_certfile):
            raise ValueError(
                "--ssl needs a private key and a certificate: set SSL_KEYFILE and SSL_CERTFILE "
                "(or --ssl-keyfile and --ssl-certfile)"
            )
        if not self.arena_db:
            raise ValueError("--arena-db must not be empty")
        try:
            parse_store_url(self.leaderboard_store_url)
        except InvalidStoreURLError as error:
            flag = "--arena-db" if self.leaderboard_url is None else "--leaderboard-url"
            raise ValueError(f"{flag}: {error}") from None

    @property
    def leaderboard_store_url(self) -> str:
        """The store the arena and the leaderboard use: --leaderboard-url, else --arena-db."""
        return self.leaderboard_url if self.leaderboard_url is not None else self.arena_db

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> GatewayConfig:
        """Build and validate the config from parsed flags (ValueError says what is wrong)."""
        return cls(
            host=ns.host,
            port=ns.port,
            # FastChat writes the address as a URL (http://host:port): gRPC wants host:port.
            controller_address=host_port(ns.controller_address),
            api_keys=tuple(dict.fromkeys(_split_keys(ns.api_keys or ()))),
            request_timeout_seconds=ns.request_timeout,
            embeddings_timeout_seconds=ns.embeddings_timeout,
            first_token_timeout_seconds=ns.first_token_timeout,
            stream_timeout_seconds=ns.stream_timeout,
            select_timeout_seconds=ns.select_timeout,
            max_concurrent_calls=ns.max_concurrent_calls,
            worker_retries=ns.worker_retries,
            shutdown_grace_seconds=ns.shutdown_grace,
            max_body_bytes=ns.max_body_bytes,
            security=GrpcSecurity.from_namespace(ns),
            log_level=ns.log_level.upper(),
            log_format=ns.log_format,
            arena_db=ns.arena_db,
            # Empty counts as unset, as an optional Secret that is missing in Kubernetes.
            leaderboard_url=ns.leaderboard_url or None,
            allowed_origins=tuple(ns.allowed_origins),
            allowed_methods=tuple(ns.allowed_methods),
            allowed_headers=tuple(ns.allowed_headers),
            allow_credentials=ns.allow_credentials,
            ssl=ns.ssl,
            ssl_keyfile=ns.ssl_keyfile or None,
            ssl_certfile=ns.ssl_certfile or None,
        )


def _split_keys(values: Sequence[str]) -> list[str]:
    return [key.strip() for value in values for key in value.split(",") if key.strip()]


class _ApiKeysAction(argparse.Action):
    """`--api-keys a,b --api-keys c` collects a, b and c; any use on the command line replaces the
    keys taken from the environment instead of adding to them."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        current = getattr(namespace, self.dest)
        keys = [] if current is self.default else list(current)
        setattr(namespace, self.dest, [*keys, values])


def add_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Declare the gateway's flags on `parser`, with defaults from CHATFLEET_* vars in `environ`."""
    defaults = GatewayConfig()
    flags = FlagParser(parser, environ)
    # Service-specific variables carry the service's name: one environment may configure them all.
    flags.add(
        "--host",
        default=defaults.host,
        env="CHATFLEET_GATEWAY_HOST",
        help="interface the HTTP server listens on",
    )
    flags.add(
        "--port",
        default=defaults.port,
        type=int,
        env="CHATFLEET_GATEWAY_PORT",
        help="HTTP port; 0 picks a free port",
    )
    flags.add(
        "--controller-address",
        default=defaults.controller_address,
        help="HOST:PORT of the controller's gRPC server",
    )
    keys_env = env_name("--api-keys")
    env_keys = environ.get(keys_env)
    parser.add_argument(
        "--api-keys",
        action=_ApiKeysAction,
        # A tuple, so the action can tell the untouched default from keys given on the command line.
        default=(env_keys,) if env_keys else (),
        metavar="KEY[,KEY...]",
        help="API keys clients must send as `Authorization: Bearer KEY`; repeatable or "
        f"comma-separated; none means no authentication (env {keys_env}; default: none)",
    )
    flags.add(
        "--request-timeout",
        default=defaults.request_timeout_seconds,
        type=float,
        env="CHATFLEET_GATEWAY_REQUEST_TIMEOUT",
        help="seconds a non-streamed completion or chat completion (and a model listing) may "
        "take end to end; past it the client gets 504",
    )
    flags.add(
        "--embeddings-timeout",
        default=defaults.embeddings_timeout_seconds,
        type=float,
        env="CHATFLEET_GATEWAY_EMBEDDINGS_TIMEOUT",
        help="seconds an embeddings request may take; past it the client gets 504",
    )
    flags.add(
        "--first-token-timeout",
        default=defaults.first_token_timeout_seconds,
        type=float,
        env="CHATFLEET_GATEWAY_FIRST_TOKEN_TIMEOUT",
        help="seconds a streamed completion may take to produce its first token (choosing a "
        "worker, queueing and prefill included); past it the client gets 504 before the stream "
        "starts. Once tokens flow only --stream-timeout limits the stream",
    )
    flags.add(
        "--stream-timeout",
        default=defaults.stream_timeout_seconds,
        type=float,
        env="CHATFLEET_GATEWAY_STREAM_TIMEOUT",
        help="seconds a streamed completion may run in all; past it the stream ends with an "
        "error event then [DONE]. 0: no limit (a stream ends at max_tokens or the context "
        "length; a dead worker or a client that leaves ends it at once)",
    )
    flags.add(
        "--select-timeout",
        default=defaults.select_timeout_seconds,
        type=float,
        env="CHATFLEET_GATEWAY_SELECT_TIMEOUT",
        help="seconds a request waits for the controller and for a healthy worker (controller "
        "restarting, workers registering again) before it fails with 503",
    )
    flags.add(
        "--max-concurrent-calls",
        default=defaults.max_concurrent_calls,
        type=int,
        env="CHATFLEET_GATEWAY_MAX_CONCURRENT_CALLS",
        help="generation and embedding calls in flight at once (one per choice or prompt); "
        "beyond it requests get 429 with Retry-After at once",
    )
    flags.add(
        "--worker-retries",
        default=defaults.worker_retries,
        type=int,
        env="CHATFLEET_GATEWAY_WORKER_RETRIES",
        help="other workers to try when the chosen one is unavailable before answering",
    )
    flags.add(
        "--shutdown-grace",
        default=defaults.shutdown_grace_seconds,
        type=float,
        env="CHATFLEET_GATEWAY_SHUTDOWN_GRACE",
        help="seconds in-flight requests get to finish on SIGINT/SIGTERM",
    )
    flags.add(
        "--max-body-bytes",
        default=defaults.max_body_bytes,
        type=int,
        env="CHATFLEET_GATEWAY_MAX_BODY_BYTES",
        help="largest request body accepted, in bytes; larger ones get 413",
    )
    _add_browser_flags(flags, defaults)
    add_security_flags(flags, server=False)
    add_logging_flags(flags, level=defaults.log_level, fmt=defaults.log_format)
    flags.add(
        "--arena-db",
        default=default_arena_db(environ),
        env="CHATFLEET_ARENA_DB",
        help="SQLite file where the web UI's arena keeps its votes (created on the first vote) "
        "when --leaderboard-url is not given",
    )
    flags.add(
        "--leaderboard-url",
        default=defaults.leaderboard_url,
        env="CHATFLEET_LEADERBOARD_URL",
        metavar="URL",
        help="where arena battles, votes and MT-bench scores live, shared by every gateway "
        "given the same URL: postgresql://USER:PASSWORD@HOST:PORT/DB for several replicas, or "
        "sqlite:///PATH (a file, one host); unset or empty: the --arena-db file",
    )


def _add_browser_flags(flags: FlagParser, defaults: GatewayConfig) -> None:
    """CORS and HTTPS, under FastChat's openai_api_server flag names."""
    lists = "a JSON list as FastChat takes it, or comma-separated"
    flags.add(
        "--allowed-origins",
        default=list(defaults.allowed_origins),
        type=parse_list,
        metavar="LIST",
        help=f"origins browsers may call the API from ({lists}); [] turns CORS off",
    )
    flags.add(
        "--allowed-methods",
        default=list(defaults.allowed_methods),
        type=parse_list,
        metavar="LIST",
        help=f"HTTP methods allowed from those origins ({lists})",
    )
    flags.add(
        "--allowed-headers",
        default=list(defaults.allowed_headers),
        type=parse_list,
        metavar="LIST",
        help=f"request headers allowed from those origins ({lists})",
    )
    flags.add_bool(
        "--allow-credentials",
        default=defaults.allow_credentials,
        help="let browsers send cookies and HTTP authentication with cross-origin requests",
    )
    flags.add_bool(
        "--ssl",
        default=defaults.ssl,
        env="CHATFLEET_GATEWAY_SSL",
        help="serve HTTPS with the key and certificate named by SSL_KEYFILE and SSL_CERTFILE "
        "(FastChat's variables) or --ssl-keyfile and --ssl-certfile",
    )
    flags.add(
        "--ssl-keyfile",
        default=flags.environ.get("SSL_KEYFILE"),
        help="PEM private key for --ssl (else SSL_KEYFILE)",
    )
    flags.add(
        "--ssl-certfile",
        default=flags.environ.get("SSL_CERTFILE"),
        help="PEM certificate (chain) for --ssl (else SSL_CERTFILE)",
    )
