"""FastChat's flags on chatfleet's services: each parses to the setting it names, FastChat's
command lines from the seeds start as they are, and flags chatfleet lacks fail saying so."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import pytest

from chatfleet.v1 import worker_pb2, worker_pb2_grpc
from services.common.fastchat_compat import (
    UNSUPPORTED_CONTROLLER_FLAGS,
    UNSUPPORTED_WORKER_FLAGS,
    host_port,
    parse_list,
)
from services.common.grpc_server import insecure_channel
from services.controller import config as controller_config
from services.controller.dispatcher import DispatchMethod
from services.gateway import config as gateway_config
from services.worker import config as worker_config
from services.worker.engine.loading import ModelSpec
from services.worker.main import Worker
from tests.unit.fakes import FakeEngine
from tests.unit.fakes import worker_config as fake_worker_config

NOT_SUPPORTED = "is a FastChat flag that chatfleet does not support"


@pytest.fixture(autouse=True)
def fake_default_models(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --model-path the worker serves the defaults found in site-packages: not needed."""
    specs = [ModelSpec("/site/chat", ("chat-default",))]
    monkeypatch.setattr(worker_config, "default_model_specs", lambda: list(specs))


def _namespace(
    service: str, add_arguments: Callable[[argparse.ArgumentParser, Mapping[str, str]], None]
) -> Callable[[list[str], Mapping[str, str] | None], argparse.Namespace]:
    def parse(argv: list[str], environ: Mapping[str, str] | None = None) -> argparse.Namespace:
        parser = argparse.ArgumentParser(prog=f"chatfleet {service}")
        add_arguments(parser, environ or {})
        return parser.parse_args(argv)

    return parse


def worker(argv: list[str], environ: Mapping[str, str] | None = None) -> worker_config.WorkerConfig:
    ns = _namespace("worker", worker_config.add_arguments)(argv, environ)
    return worker_config.WorkerConfig.from_namespace(ns)


def controller(argv: list[str]) -> controller_config.ControllerConfig:
    ns = _namespace("controller", controller_config.add_arguments)(argv, None)
    return controller_config.ControllerConfig.from_namespace(ns)


def gateway(
    argv: list[str], environ: Mapping[str, str] | None = None
) -> gateway_config.GatewayConfig:
    ns = _namespace("gateway", gateway_config.add_arguments)(argv, environ)
    return gateway_config.GatewayConfig.from_namespace(ns)


# --- worker (fastchat.serve.model_worker and multi_model_worker) ---------------------------------


def test_model_path_and_model_names_as_fastchat_takes_them() -> None:
    one = worker(["--model-path", "/models/vicuna", "--model-names", "vicuna,gpt-3.5-turbo"])
    assert one.models == (ModelSpec("/models/vicuna", ("vicuna", "gpt-3.5-turbo")),)
    # multi_model_worker: --model-path and --model-names repeated in pairs.
    many = worker(
        ["--model-path", "/m/a", "--model-names", "a", "--model-path", "/m/b", "--model-names", "b"]
    )
    assert many.models == (ModelSpec("/m/a", ("a",)), ModelSpec("/m/b", ("b",)))
    # Without --model-names the name comes from the path, as FastChat's does.
    assert worker(["--model-path", "/m/c"]).models == (ModelSpec("/m/c", ()),)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://localhost:21001", "localhost:21001"),
        ("https://10.0.0.5:21001/", "10.0.0.5:21001"),
        ("localhost:21001", "localhost:21001"),
        ("http://[::1]:21001", "[::1]:21001"),
    ],
)
def test_addresses_written_as_urls_become_grpc_targets(given: str, expected: str) -> None:
    assert host_port(given) == expected
    config = worker(["--controller-address", given, "--worker-address", given])
    assert config.controller_address == expected
    assert config.advertised_address(12345) == expected
    assert gateway(["--controller-address", given]).controller_address == expected


def test_host_port_device_dtype() -> None:
    config = worker(
        ["--host", "0.0.0.0", "--port", "31000", "--device", "cpu", "--dtype", "float16"]
    )
    assert (config.host, config.port) == ("0.0.0.0", 31000)
    assert (config.engine_options().device, config.engine_options().dtype) == ("cpu", "float16")


def test_load_8bit_is_int8_weights() -> None:
    assert worker([]).engine_options().quantization == "auto"
    config = worker(["--load-8bit", "--device", "cpu"])
    assert config.quantization == "int8"
    assert config.engine_options().quantization == "int8"


@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps"])
def test_load_8bit_off_the_cpu_is_a_clear_error(device: str) -> None:
    with pytest.raises(ValueError, match="int8 weights run on the CPU only"):
        worker(["--load-8bit", "--device", device])


def test_limit_worker_concurrency_is_the_batch_size() -> None:
    config = worker(["--limit-worker-concurrency", "5"])
    assert config.max_running == 5
    assert config.engine_options().max_running == 5
    with pytest.raises(ValueError, match="at least 1"):
        worker(["--limit-worker-concurrency", "0"])


def test_no_register() -> None:
    assert worker([]).no_register is False
    assert worker(["--no-register"]).no_register is True


def test_seed_from_flag_and_environment() -> None:
    assert worker([]).seed is None
    assert worker(["--seed", "42"]).seed == 42
    assert worker([], {"CHATFLEET_WORKER_SEED": "7"}).seed == 7
    with pytest.raises(ValueError, match="--seed"):
        worker(["--seed", "-1"])


def test_num_gpus_and_max_gpu_memory() -> None:
    config = worker(["--num-gpus", "1", "--max-gpu-memory", "13GiB"])
    assert (config.num_gpus, config.max_gpu_memory) == (1, "13GiB")
    # FastChat ignores --num-gpus on the CPU; chatfleet too.
    assert worker(["--device", "cpu", "--num-gpus", "2"]).num_gpus == 2
    with pytest.raises(ValueError, match="one worker per GPU"):
        worker(["--device", "cuda", "--num-gpus", "2"])
    with pytest.raises(SystemExit):
        worker(["--max-gpu-memory", "lots"])


def test_embed_in_truncate_is_accepted_as_what_chatfleet_always_does() -> None:
    assert worker(["--embed-in-truncate"]).models == worker([]).models


@pytest.mark.parametrize("flag", sorted(UNSUPPORTED_WORKER_FLAGS))
def test_unsupported_worker_flags_say_so(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in ([flag], [flag, "4"], [f"{flag}=4"]):
        with pytest.raises(SystemExit) as stopped:
            worker(["--model-path", "/m/x", *argv])
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert f"{flag} {NOT_SUPPORTED}: {UNSUPPORTED_WORKER_FLAGS[flag]}" in err
        assert "unrecognized" not in err


def test_unsupported_flags_stay_out_of_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        worker(["--help"])
    out = capsys.readouterr().out
    assert "--gptq-ckpt" not in out
    assert "--limit-worker-concurrency" in out and "--load-8bit" in out


# --- controller (fastchat.serve.controller) ------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "method"),
    [("lottery", DispatchMethod.LOTTERY), ("shortest_queue", DispatchMethod.SHORTEST_QUEUE)],
)
def test_dispatch_method(value: str, method: DispatchMethod) -> None:
    assert controller(["--dispatch-method", value]).dispatch_method is method


@pytest.mark.parametrize("flag", sorted(UNSUPPORTED_CONTROLLER_FLAGS))
def test_unsupported_controller_flags_say_so(flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        controller([flag])
    assert f"{flag} {NOT_SUPPORTED}" in capsys.readouterr().err


# --- gateway (fastchat.serve.openai_api_server) ---------------------------------------------------


def test_cors_defaults_let_any_browser_origin_in_without_credentials() -> None:
    config = gateway([])
    assert config.allowed_origins == config.allowed_methods == config.allowed_headers == ("*",)
    assert config.allow_credentials is False


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('["http://localhost:3000", "https://chat.example"]', ("http://localhost:3000", "https://chat.example")),
        ("http://localhost:3000,https://chat.example", ("http://localhost:3000", "https://chat.example")),
        ("[]", ()),
    ],
)  # fmt: skip
def test_allowed_origins_as_json_like_fastchat_or_comma_separated(
    value: str, expected: tuple[str, ...]
) -> None:
    assert gateway(["--allowed-origins", value]).allowed_origins == expected


def test_cors_flags() -> None:
    config = gateway(
        [
            "--allowed-methods", '["GET", "POST"]',
            "--allowed-headers", "authorization,content-type",
            "--allow-credentials",
        ]
    )  # fmt: skip
    assert config.allowed_methods == ("GET", "POST")
    assert config.allowed_headers == ("authorization", "content-type")
    assert config.allow_credentials is True


def test_cors_from_the_environment() -> None:
    environ = {"CHATFLEET_ALLOWED_ORIGINS": '["http://a"]', "CHATFLEET_ALLOW_CREDENTIALS": "1"}
    config = gateway([], environ)
    assert (config.allowed_origins, config.allow_credentials) == (("http://a",), True)


def test_a_list_that_is_not_a_json_list_of_strings_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        gateway(["--allowed-origins", '["http://a", 3]'])
    assert "not a JSON list of strings" in capsys.readouterr().err
    with pytest.raises(ValueError, match="JSON list"):
        parse_list('["unterminated')


def test_api_keys_comma_separated_as_fastchat() -> None:
    assert gateway(["--api-keys", "sk-1,sk-2"]).api_keys == ("sk-1", "sk-2")


def test_ssl_takes_fastchats_environment_variables() -> None:
    environ = {"SSL_KEYFILE": "/tls/key.pem", "SSL_CERTFILE": "/tls/cert.pem"}
    config = gateway(["--ssl"], environ)
    assert (config.ssl, config.ssl_keyfile, config.ssl_certfile) == (
        True,
        "/tls/key.pem",
        "/tls/cert.pem",
    )
    # Without --ssl the variables alone change nothing, as in FastChat.
    assert gateway([], environ).ssl is False
    flags = gateway(["--ssl", "--ssl-keyfile", "/k", "--ssl-certfile", "/c"], environ)
    assert (flags.ssl_keyfile, flags.ssl_certfile) == ("/k", "/c")


def test_ssl_without_key_and_certificate_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="SSL_KEYFILE and SSL_CERTFILE"):
        gateway(["--ssl"], {"SSL_CERTFILE": "/tls/cert.pem"})


# --- FastChat command lines, as the seeds write them ---------------------------------------------


@pytest.mark.parametrize(
    ("service", "argv"),
    [
        ("controller", ["--host", "0.0.0.0"]),
        ("controller", ["--host", "0.0.0.0", "--port", "21001", "--dispatch-method", "lottery"]),
        ("worker", ["--model-path", "/mnt/models/chatglm2-6b"]),
        ("worker", ["--model-path", "/models/chatglm2-6b", "--host", "0.0.0.0"]),
        (
            "worker",
            [
                "--model-path", "lmsys/vicuna-7b-v1.5-16k", "--host", "200.200.32.195",
                "--worker-address", "http://200.200.32.195:55082",
                "--controller-address", "http://200.200.32.195:21001",
                "--port", "55082", "--device", "cpu",
            ],
        ),
        (
            "worker",
            [
                "--model-path", "lmsys/vicuna-13b-v1.3", "--model-names", "gpt-3.5-turbo",
                "--limit-worker-concurrency", "2", "--seed", "0",
            ],
        ),
        (
            "worker",
            [
                "--model-path", "/mnt/models/chatglm2-6b-cmeee_eie001",
                "--model-names", "chatglm2-6b-cmeee_eie001",
                "--model-path", "/mnt/models/chatglm2-6b", "--model-names", "chatglm2-6b",
            ],
        ),
        ("gateway", ["--host", "localhost", "--port", "8000"]),
        ("gateway", ["--host", "0.0.0.0", "--controller-address", "http://localhost:21001"]),
    ],
)  # fmt: skip
def test_fastchat_command_lines_parse(service: str, argv: list[str]) -> None:
    build: dict[str, Callable[[list[str]], Any]] = {
        "controller": controller,
        "worker": worker,
        "gateway": gateway,
    }
    build[service](argv)


# --- --seed reaches the sampling of requests that bring none --------------------------------------


async def test_worker_seed_is_the_default_seed_of_requests() -> None:
    engine = FakeEngine("fake-chat")
    config = dataclasses.replace(fake_worker_config(), seed=1234)
    running = await Worker.start(config, engines=[engine])
    try:
        async with insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            for sampling in (worker_pb2.SamplingParams(), worker_pb2.SamplingParams(seed=5)):
                request = worker_pb2.GenerateRequest(
                    model="fake-chat", text="hi", sampling=sampling
                )
                async for _ in stub.Generate(request):
                    pass
    finally:
        await running.stop()
    assert [r.sampling.seed for r in engine.requests] == [1234, 5]
