"""ControllerConfig from flags and CHATFLEET_* variables, and the entry point's life cycle."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import Mapping

import pytest

from services.controller import main as controller_main
from services.controller.config import ControllerConfig, add_arguments
from services.controller.dispatcher import DispatchMethod

WAIT_S = 10.0


def parse(argv: list[str], environ: Mapping[str, str] | None = None) -> ControllerConfig:
    parser = argparse.ArgumentParser(prog="chatfleet controller")
    add_arguments(parser, environ or {})
    return ControllerConfig.from_namespace(parser.parse_args(argv))


def test_defaults() -> None:
    assert parse([]) == ControllerConfig(
        host="127.0.0.1",
        port=21001,
        dispatch_method=DispatchMethod.SHORTEST_QUEUE,
        heartbeat_interval=5,
        log_level="INFO",
        log_format="text",
    )


def test_flags_and_environment() -> None:
    environ = {"CHATFLEET_DISPATCH_METHOD": "lottery", "CHATFLEET_CONTROLLER_PORT": "0"}
    config = parse(["--heartbeat-interval", "2", "--log-level", "debug"], environ)
    assert config.dispatch_method is DispatchMethod.LOTTERY
    assert config.port == 0
    assert config.heartbeat_interval == 2
    assert config.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--heartbeat-interval", "0"], "--heartbeat-interval"),
        (["--port", "-1"], "--port"),
        (["--shutdown-grace", "-1"], "--shutdown-grace"),
    ],
)
def test_bad_values_are_value_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(argv)


def test_unknown_dispatch_method_is_a_usage_error() -> None:
    with pytest.raises(SystemExit):
        parse(["--dispatch-method", "round_robin"])


async def test_serve_sets_ready_and_stops_on_sigterm() -> None:
    ready = asyncio.Event()
    serving = asyncio.create_task(controller_main.serve(ControllerConfig(port=0), ready=ready))
    await asyncio.wait_for(ready.wait(), WAIT_S)
    os.kill(os.getpid(), signal.SIGTERM)  # handled by serve(): a graceful stop, not an exit
    await asyncio.wait_for(serving, WAIT_S)


async def test_serve_stops_when_cancelled() -> None:
    ready = asyncio.Event()
    serving = asyncio.create_task(controller_main.serve(ControllerConfig(port=0), ready=ready))
    await asyncio.wait_for(ready.wait(), WAIT_S)
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
