"""WorkerConfig from flags and CHATFLEET_* variables."""

from __future__ import annotations

import argparse
from collections.abc import Mapping

import pytest

from services.worker import config as worker_config
from services.worker.config import WorkerConfig, add_arguments
from services.worker.engine.loading import EngineOptions, ModelSpec

DEFAULT_SPECS = [ModelSpec("/site/chat", ("chat-default",)), ModelSpec("/site/embed", ("embed",))]


@pytest.fixture(autouse=True)
def fake_default_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """The defaults resolve paths in site-packages; these tests need not depend on them."""
    monkeypatch.setattr(worker_config, "default_model_specs", lambda: list(DEFAULT_SPECS))


def parse(argv: list[str], environ: Mapping[str, str] | None = None) -> WorkerConfig:
    parser = argparse.ArgumentParser(prog="chatfleet worker")
    add_arguments(parser, environ or {})
    return WorkerConfig.from_namespace(parser.parse_args(argv))


def test_defaults() -> None:
    config = parse([])
    assert config.models == tuple(DEFAULT_SPECS)
    assert (config.host, config.port) == ("127.0.0.1", 21002)
    assert config.controller_address == "127.0.0.1:21001"
    assert config.no_register is False
    # The served default quantizes where the CPU multiplies small weights fast (approximate);
    # in-process engines stay exact unless asked.
    assert config.engine_options() == EngineOptions(quantization="auto")
    assert config.heartbeat_interval == 5.0
    assert config.shutdown_grace == 10.0
    assert config.advertised_address(21002) == "127.0.0.1:21002"


def test_repeated_model_paths_pair_with_their_names() -> None:
    config = parse(
        [
            "--model-path",
            "/m/a",
            "--model-names",
            "a,alias-a",
            "--model-path",
            "/m/b",
            "--model-names",
            "",
        ]
    )
    assert config.models == (ModelSpec("/m/a", ("a", "alias-a")), ModelSpec("/m/b", ()))


def test_model_paths_from_the_environment_are_replaced_by_flags() -> None:
    environ = {"CHATFLEET_MODEL_PATH": "/env/a;/env/b", "CHATFLEET_MODEL_NAMES": "a,x;b"}
    from_env = parse([], environ)
    assert from_env.models == (ModelSpec("/env/a", ("a", "x")), ModelSpec("/env/b", ("b",)))
    from_flags = parse(["--model-path", "/cli/c", "--model-names", "c"], environ)
    assert from_flags.models == (ModelSpec("/cli/c", ("c",)),)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model-path", "/a", "--model-path", "/b", "--model-names", "a"], "once per"),
        (["--model-names", "a"], "matching --model-path"),
        (
            "--model-path /a --model-names x --model-path /b --model-names x".split(),
            "'x' is used by /a and /b",
        ),
        (["--model-path", "/a", "--model-names", "x,x"], "used twice"),
        (["--device", "tpu"], "--device"),
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--max-queue", "-1"], "--max-queue"),
        (["--heartbeat-interval", "0"], "--heartbeat-interval"),
        (["--threads", "-2"], "--threads"),
        (["--port", "70000"], "--port"),
    ],
)
def test_bad_flags_are_value_errors(argv: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(argv)


def test_engine_and_registration_flags() -> None:
    config = parse(
        [
            "--max-batch-size",
            "4",
            "--max-queue",
            "8",
            "--threads",
            "2",
            "--device",
            "cuda:1",
            "--dtype",
            "bfloat16",
            "--no-register",
            "--port",
            "0",
            "--host",
            "0.0.0.0",
        ]
    )
    assert config.engine_options() == EngineOptions(
        device="cuda:1",
        dtype="bfloat16",
        max_running=4,
        max_waiting=8,
        threads=2,
        quantization="auto",
    )
    assert config.no_register is True
    assert not config.advertised_address(4242).startswith("0.0.0.0")


def test_environment_fallbacks() -> None:
    config = parse(
        [],
        {
            "CHATFLEET_WORKER_PORT": "0",
            "CHATFLEET_WORKER_ADDRESS": "worker-7:9000",
            "CHATFLEET_CONTROLLER_ADDRESS": "ctl:1",
            "CHATFLEET_WORKER_REGISTER": "false",
            "CHATFLEET_MAX_BATCH_SIZE": "3",
            "CHATFLEET_WORKER_HEARTBEAT_INTERVAL": "0.5",
        },
    )
    assert config.port == 0
    assert config.advertised_address(1234) == "worker-7:9000"
    assert config.controller_address == "ctl:1"
    assert config.no_register is True
    assert config.max_running == 3
    assert config.heartbeat_interval == 0.5


def test_missing_default_models_are_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> list[ModelSpec]:
        raise FileNotFoundError("default model not found; run `make install`")

    monkeypatch.setattr(worker_config, "default_model_specs", missing)
    with pytest.raises(ValueError, match="make install"):
        parse([])
