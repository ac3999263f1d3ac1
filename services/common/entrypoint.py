"""The shared `main()` of every service: parse flags, build the config, log, serve."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol, TypeVar

from services.common.logs import configure_logging

logger = logging.getLogger(__name__)


class ServiceConfig(Protocol):
    @property
    def log_level(self) -> str: ...

    @property
    def log_format(self) -> str: ...


C = TypeVar("C", bound=ServiceConfig)


class ServiceFailedError(Exception):
    """A running service lost something it cannot serve without; it stopped and exits 1."""


def run_service(
    argv: list[str] | None,
    *,
    name: str,
    description: str,
    add_arguments: Callable[[argparse.ArgumentParser, Mapping[str, str]], None],
    build_config: Callable[[argparse.Namespace], C],
    serve: Callable[[C], Coroutine[Any, Any, None]],
) -> int:
    """Run `chatfleet NAME` until it stops: 0 on a clean stop, 1 when it cannot start (a port in
    use, missing weights...) or had to stop (ServiceFailedError), 2 with a usage message for bad
    flags."""
    parser = argparse.ArgumentParser(prog=f"chatfleet {name}", description=description)
    add_arguments(parser, os.environ)
    ns = parser.parse_args(argv)
    try:
        config = build_config(ns)
    except ValueError as error:
        parser.error(str(error))
    configure_logging(config.log_level, config.log_format)
    try:
        asyncio.run(serve(config))
    except KeyboardInterrupt:
        pass
    except (OSError, ValueError) as error:
        logger.error("%s cannot start: %s", name, error)
        return 1
    except ServiceFailedError as error:
        logger.error("%s stopped: %s", name, error)
        return 1
    return 0
