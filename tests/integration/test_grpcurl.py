"""grpcurl against the live services through server reflection, with no proto files at hand."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import CHAT_MODEL, Stack

pytestmark = pytest.mark.integration

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or "grpcurl"


def grpcurl(*args: str) -> str:
    done = subprocess.run(
        [GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_list_services(stack: Stack) -> None:
    worker_services = grpcurl(stack.worker_address, "list").split()
    assert "chatfleet.v1.WorkerService" in worker_services
    assert "grpc.health.v1.Health" in worker_services
    controller_services = grpcurl(stack.controller_address, "list").split()
    assert "chatfleet.v1.ControllerService" in controller_services
    assert "grpc.health.v1.Health" in controller_services


def test_describe(stack: Stack) -> None:
    described = grpcurl(stack.worker_address, "describe", "chatfleet.v1.WorkerService")
    assert "rpc Generate" in described and "stream .chatfleet.v1.GenerateResponse" in described


def test_health_check(stack: Stack) -> None:
    for address in (stack.worker_address, stack.controller_address):
        reply = json.loads(grpcurl(address, "grpc.health.v1.Health/Check"))
        assert reply["status"] == "SERVING"


def test_generate_stream(stack: Stack) -> None:
    request = {
        "model": CHAT_MODEL,
        "chat": {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
        "sampling": {"temperature": 0},
        "stopping": {"max_tokens": 24},
    }
    out = grpcurl(
        "-d", json.dumps(request), stack.worker_address, "chatfleet.v1.WorkerService/Generate"
    )
    # grpcurl prints one JSON object per streamed message.
    messages = [json.loads(part) for part in out.replace("}\n{", "}\x00{").split("\x00")]
    text = "".join(message.get("text", "") for message in messages)
    assert "Paris" in text
    assert messages[-1]["finish_reason"] in {"FINISH_REASON_STOP", "FINISH_REASON_LENGTH"}
    assert int(messages[-1]["usage"]["completion_tokens"]) > 0


def test_controller_lists_worker(stack: Stack) -> None:
    reply = json.loads(
        grpcurl(stack.controller_address, "chatfleet.v1.ControllerService/ListWorkers")
    )
    (worker,) = reply["workers"]
    assert worker["address"] == stack.worker_address
    assert worker["state"] == "WORKER_STATE_SERVING"
