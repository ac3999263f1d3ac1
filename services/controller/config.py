"""The controller's configuration: a frozen dataclass from flags with CHATFLEET_* fallbacks."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.common.config import LOG_FORMATS, LOG_LEVELS, FlagParser, add_logging_flags
from services.common.fastchat_compat import UNSUPPORTED_CONTROLLER_FLAGS, add_unsupported_flags
from services.common.metrics_server import add_metrics_port_flag, check_metrics_port
from services.common.security import GrpcSecurity, add_security_flags
from services.controller.dispatcher import DispatchMethod


@dataclass(frozen=True)
class ControllerConfig:
    host: str = "127.0.0.1"
    port: int = 21001
    dispatch_method: DispatchMethod = DispatchMethod.SHORTEST_QUEUE
    # Told to workers at registration: how often they should report their load.
    heartbeat_interval: int = 5
    # How long in-flight calls may take to finish on shutdown.
    shutdown_grace: float = 5.0
    # A worker unreachable this long is dropped from the registry (it re-registers when it is
    # back); 0 keeps unreachable workers for ever.
    forget_after: float = 300.0
    # Token and TLS of its server, and of its health Watch calls to workers.
    security: GrpcSecurity = field(default_factory=GrpcSecurity)
    log_level: str = "INFO"
    log_format: str = "text"
    # Port of the Prometheus /metrics endpoint (0: a free one); None: no endpoint.
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        check_metrics_port(self.metrics_port)
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be between 0 and 65535, got {self.port}")
        if self.heartbeat_interval < 1:
            raise ValueError(
                f"--heartbeat-interval must be at least 1 second, got {self.heartbeat_interval}"
            )
        if self.shutdown_grace < 0:
            raise ValueError(f"--shutdown-grace must not be negative, got {self.shutdown_grace}")
        if self.forget_after < 0:
            raise ValueError(f"--forget-after must not be negative, got {self.forget_after}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ValueError(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}")

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> ControllerConfig:
        """Build and validate the config from parsed flags; ValueError with a clear message."""
        try:
            method = DispatchMethod(ns.dispatch_method)
        except ValueError:
            choices = ", ".join(m.value for m in DispatchMethod)
            raise ValueError(f"--dispatch-method must be one of {choices}") from None
        return cls(
            host=ns.host,
            port=ns.port,
            dispatch_method=method,
            heartbeat_interval=ns.heartbeat_interval,
            shutdown_grace=ns.shutdown_grace,
            forget_after=ns.forget_after,
            security=GrpcSecurity.from_namespace(ns),
            log_level=ns.log_level.upper(),
            log_format=ns.log_format,
            metrics_port=ns.metrics_port,
        )


def add_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Declare the controller's flags on `parser`, with defaults from `environ`."""
    flags = FlagParser(parser, environ)
    defaults = ControllerConfig()
    flags.add(
        "--host",
        default=defaults.host,
        help="address to listen on",
        env="CHATFLEET_CONTROLLER_HOST",
    )
    flags.add(
        "--port",
        default=defaults.port,
        type=int,
        help="port to listen on (0 picks a free one)",
        env="CHATFLEET_CONTROLLER_PORT",
    )
    flags.add(
        "--dispatch-method",
        default=defaults.dispatch_method.value,
        choices=[m.value for m in DispatchMethod],
        help="how a worker is chosen when a request does not say",
    )
    flags.add(
        "--heartbeat-interval",
        default=defaults.heartbeat_interval,
        type=int,
        help="seconds between the load reports workers are asked to send",
        env="CHATFLEET_CONTROLLER_HEARTBEAT_INTERVAL",
    )
    flags.add(
        "--shutdown-grace",
        default=defaults.shutdown_grace,
        type=float,
        help="seconds in-flight calls may take to finish on SIGTERM",
        env="CHATFLEET_CONTROLLER_SHUTDOWN_GRACE",
    )
    flags.add(
        "--forget-after",
        default=defaults.forget_after,
        type=float,
        help="seconds a worker may stay unreachable before it is dropped from the registry "
        "(it re-registers when it comes back); 0 keeps it for ever",
        env="CHATFLEET_CONTROLLER_FORGET_AFTER",
    )
    add_security_flags(flags)
    add_logging_flags(flags, level=defaults.log_level, fmt=defaults.log_format)
    add_metrics_port_flag(flags, env="CHATFLEET_CONTROLLER_METRICS_PORT")
    add_unsupported_flags(parser, UNSUPPORTED_CONTROLLER_FLAGS)
