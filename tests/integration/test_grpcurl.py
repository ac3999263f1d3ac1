"""The README's grpcurl examples, run verbatim against live services (reflection, no proto files).

The commands come from the README block marked `grpcurl-examples`; only the two addresses are
substituted with the stack's free ports. Every command needs a check of its answer below."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import CHAT_MODEL, EMBEDDING_MODEL, Stack

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"
MARKER = "<!-- grpcurl-examples"
README_WORKER = "127.0.0.1:21002"
README_CONTROLLER = "127.0.0.1:21001"


def readme_commands(readme: str) -> list[list[str]]:
    """The argv of each command in the block after the marker, split as a POSIX shell would."""
    after = readme[readme.index(MARKER) :]
    block = re.search(r"```(?:bash|sh)\n(.*?)```", after, re.DOTALL)
    assert block is not None, f"no fenced block after {MARKER} in README.md"
    commands: list[list[str]] = []
    pending = ""
    for line in block.group(1).splitlines(keepends=True):
        pending += line
        if pending.rstrip("\n").endswith("\\"):
            continue  # a line continuation
        try:
            argv = shlex.split(pending.replace("\\\n", ""), comments=True)
        except ValueError:
            continue  # inside a quoted string that spans lines
        if argv:
            commands.append(argv)
        pending = ""
    assert not pending.strip(), f"unterminated command in README.md: {pending!r}"
    return commands


COMMANDS = readme_commands(README.read_text())


def label(argv: list[str]) -> str:
    """What a command asks for: its words after the address, e.g. `describe chatfleet.v1.X`."""
    for address in (README_WORKER, README_CONTROLLER):
        if address in argv:
            server = "worker" if address == README_WORKER else "controller"
            request = json.loads(argv[argv.index("-d") + 1]) if "-d" in argv else {}
            asked = " ".join(argv[argv.index(address) + 1 :])
            # A health check of one service differs from the server's only by its request.
            service = f" service={request['service']}" if "service" in request else ""
            return f"{server} {asked}{service}"
    raise AssertionError(f"README command names neither example address: {shlex.join(argv)}")


def json_messages(out: str) -> list[dict[str, Any]]:
    """grpcurl prints one pretty JSON object per message (several for a stream)."""
    decoder = json.JSONDecoder()
    messages, rest = [], out.strip()
    while rest:
        message, end = decoder.raw_decode(rest)
        messages.append(message)
        rest = rest[end:].lstrip()
    return messages


def check_list(out: str, stack: Stack) -> None:
    services = out.split()
    assert {"chatfleet.v1.WorkerService", "grpc.health.v1.Health"} <= set(services)
    assert any(name.startswith("grpc.reflection.") for name in services)


def check_describe_service(out: str, stack: Stack) -> None:
    assert "chatfleet.v1.WorkerService is a service" in out
    assert "rpc Generate ( .chatfleet.v1.GenerateRequest ) returns ( stream " in out
    for rpc in ("Embed", "Tokenize", "GetModelInfo", "GetLoad"):
        assert f"rpc {rpc} (" in out


def check_describe_message(out: str, stack: Stack) -> None:
    assert "chatfleet.v1.GenerateRequest is a message" in out
    assert "oneof prompt" in out and ".chatfleet.v1.StoppingCriteria stopping = 7;" in out


def check_serving(out: str, stack: Stack) -> None:
    assert json_messages(out) == [{"status": "SERVING"}]


def check_generate(out: str, stack: Stack) -> None:
    messages = json_messages(out)
    assert len(messages) >= 2  # streamed: several messages, the finish reason on the last
    assert "Paris" in "".join(message.get("text", "") for message in messages)
    last = messages[-1]
    assert last["finish_reason"] in {"FINISH_REASON_STOP", "FINISH_REASON_LENGTH"}
    assert 0 < int(last["usage"]["completion_tokens"]) <= 32


def check_list_models(out: str, stack: Stack) -> None:
    (reply,) = json_messages(out)
    names = [model["name"] for model in reply["models"]]
    assert CHAT_MODEL in names and EMBEDDING_MODEL in names


def check_select_worker(out: str, stack: Stack) -> None:
    (reply,) = json_messages(out)
    assert reply["address"] == stack.worker_address
    assert reply["model"]["name"] == CHAT_MODEL


def check_list_workers(out: str, stack: Stack) -> None:
    (reply,) = json_messages(out)
    (worker,) = reply["workers"]
    assert worker["address"] == stack.worker_address
    assert worker["state"] == "WORKER_STATE_SERVING"


CHECKS: dict[str, Callable[[str, Stack], None]] = {
    "worker list": check_list,
    "worker describe chatfleet.v1.WorkerService": check_describe_service,
    "worker describe chatfleet.v1.GenerateRequest": check_describe_message,
    "worker grpc.health.v1.Health/Check": check_serving,
    "worker grpc.health.v1.Health/Check service=chatfleet.v1.WorkerService": check_serving,
    "worker chatfleet.v1.WorkerService/Generate": check_generate,
    "controller chatfleet.v1.ControllerService/ListModels": check_list_models,
    "controller chatfleet.v1.ControllerService/SelectWorker": check_select_worker,
    "controller chatfleet.v1.ControllerService/ListWorkers": check_list_workers,
}


def test_readme_shows_list_describe_health_and_generate() -> None:
    labels = [label(argv) for argv in COMMANDS]
    assert all(argv[0] == "grpcurl" for argv in COMMANDS)
    for required in (
        "worker list",
        "worker describe chatfleet.v1.WorkerService",
        "worker grpc.health.v1.Health/Check",
        "worker chatfleet.v1.WorkerService/Generate",
    ):
        assert required in labels, f"README's grpcurl examples lost `{required}`"
    unchecked = [name for name in labels if name not in CHECKS]
    assert not unchecked, f"README grpcurl commands without a check here: {unchecked}"


@pytest.mark.parametrize("argv", COMMANDS, ids=[label(argv) for argv in COMMANDS])
def test_readme_grpcurl_example(argv: list[str], stack: Stack) -> None:
    ports = {README_WORKER: stack.worker_address, README_CONTROLLER: stack.controller_address}
    command = [ports.get(arg, arg) for arg in argv]
    # `grpcurl` as the README spells it, found where the dev install puts it.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, check=False, env=env
    )
    assert done.returncode == 0, done.stderr
    CHECKS[label(argv)](done.stdout, stack)
