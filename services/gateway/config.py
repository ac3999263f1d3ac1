"""The gateway's configuration: a frozen dataclass built from flags with CHATFLEET_* fallbacks."""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.common.config import LOG_FORMATS, LOG_LEVELS, FlagParser, add_logging_flags, env_name


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway needs to start; validated once by `from_namespace`."""

    host: str = "127.0.0.1"
    port: int = 8000
    controller_address: str = "127.0.0.1:21001"
    # Empty: no authentication. Otherwise every route but /health needs `Bearer <one of these>`.
    api_keys: tuple[str, ...] = ()
    # Budget for a whole HTTP request, passed down as the gRPC deadline of every call it makes.
    request_timeout_seconds: float = 600.0
    # How many other workers to try when the chosen one answers UNAVAILABLE before producing output.
    worker_retries: int = 2
    # How long in-flight requests may take to finish once shutdown starts.
    shutdown_grace_seconds: float = 10.0
    log_level: str = "INFO"
    log_format: str = "text"

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
        if not (self.request_timeout_seconds > 0 and math.isfinite(self.request_timeout_seconds)):
            raise ValueError(
                f"--request-timeout must be a positive number of seconds, "
                f"got {self.request_timeout_seconds}"
            )
        if self.worker_retries < 0:
            raise ValueError(f"--worker-retries must be >= 0, got {self.worker_retries}")
        if not self.shutdown_grace_seconds >= 0:
            raise ValueError(
                f"--shutdown-grace must be >= 0 seconds, got {self.shutdown_grace_seconds}"
            )
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> GatewayConfig:
        """Build and validate the config from parsed flags (ValueError says what is wrong)."""
        return cls(
            host=ns.host,
            port=ns.port,
            controller_address=ns.controller_address,
            api_keys=tuple(dict.fromkeys(_split_keys(ns.api_keys or ()))),
            request_timeout_seconds=ns.request_timeout,
            worker_retries=ns.worker_retries,
            shutdown_grace_seconds=ns.shutdown_grace,
            log_level=ns.log_level.upper(),
            log_format=ns.log_format,
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
        help="seconds a request may take end to end; past it the client gets 504",
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
    add_logging_flags(flags, level=defaults.log_level, fmt=defaults.log_format)
