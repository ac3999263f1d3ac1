"""The gateway's flags, environment fallbacks and validation."""

from __future__ import annotations

import argparse

import pytest

from services.gateway.config import GatewayConfig, add_arguments
from services.gateway.main import main


def parse(argv: list[str], environ: dict[str, str] | None = None) -> GatewayConfig:
    parser = argparse.ArgumentParser(prog="chatfleet gateway")
    add_arguments(parser, environ or {})
    return GatewayConfig.from_namespace(parser.parse_args(argv))


def test_defaults() -> None:
    config = parse([])
    assert config == GatewayConfig()
    assert (config.host, config.port) == ("127.0.0.1", 8000)
    assert config.controller_address == "127.0.0.1:21001"
    assert config.api_keys == ()


def test_flags() -> None:
    config = parse(
        [
            "--host=0.0.0.0",
            "--port=0",
            "--controller-address=ctrl:1",
            "--request-timeout=2.5",
            "--worker-retries=0",
            "--shutdown-grace=1",
            "--log-level=debug",
            "--log-format=json",
        ]
    )
    assert (config.host, config.port, config.controller_address) == ("0.0.0.0", 0, "ctrl:1")
    assert config.request_timeout_seconds == 2.5
    assert config.worker_retries == 0
    assert config.shutdown_grace_seconds == 1.0
    assert (config.log_level, config.log_format) == ("DEBUG", "json")


def test_api_keys_are_repeatable_and_comma_separated() -> None:
    config = parse(["--api-keys", "a,b", "--api-keys", "c", "--api-keys", "a"])
    assert config.api_keys == ("a", "b", "c")


def test_environment_fallbacks_and_flags_winning() -> None:
    environ = {
        "CHATFLEET_GATEWAY_PORT": "9000",
        "CHATFLEET_CONTROLLER_ADDRESS": "c:2",
        "CHATFLEET_API_KEYS": "k1,k2",
        "CHATFLEET_GATEWAY_REQUEST_TIMEOUT": "30",
        # Another service's variable is no concern of the gateway.
        "CHATFLEET_CONTROLLER_PORT": "1234",
    }
    config = parse([], environ)
    assert (config.port, config.controller_address) == (9000, "c:2")
    assert config.api_keys == ("k1", "k2")
    assert config.request_timeout_seconds == 30.0
    overridden = parse(["--api-keys", "k3", "--port", "1"], environ)
    assert overridden.api_keys == ("k3",)
    assert overridden.port == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port=70000"], "--port"),
        (["--controller-address=nohost"], "--controller-address"),
        (["--request-timeout=0"], "--request-timeout"),
        (["--request-timeout=inf"], "--request-timeout"),
        (["--worker-retries=-1"], "--worker-retries"),
        (["--shutdown-grace=-1"], "--shutdown-grace"),
    ],
)
def test_invalid_values_are_clear_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(argv)


def test_main_reports_invalid_config_as_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--request-timeout=-1"])
    assert exit_info.value.code == 2
    assert "--request-timeout" in capsys.readouterr().err


def test_every_flag_has_help_naming_its_environment_variable() -> None:
    parser = argparse.ArgumentParser(prog="chatfleet gateway")
    add_arguments(parser, {})
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and "CHATFLEET_" in action.help, action.dest
