"""The Node.js and C++ clients (clients/), built from protos/, against the live services: each lists
the models through the controller, gets a worker from SelectWorker and streams Generate from it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import CHAT_MODEL, EMBEDDING_MODEL, Stack

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
QUESTION = "What is the capital of France?"
FINISHED = {"FINISH_REASON_STOP", "FINISH_REASON_LENGTH"}


def make(target: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", target],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def node_client() -> list[str]:
    """`node clients/node/chat.js`, its npm packages installed by `make node-client` (npm ci)."""
    node = shutil.which("node")
    if node is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are not installed: the Node client cannot run here")
    done = make("node-client", timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return [node, str(ROOT / "clients" / "node" / "chat.js")]


@pytest.fixture(scope="session")
def cpp_client() -> list[str]:
    """clients/cpp/build/chatfleet-chat, built by `make cpp-client` with Debian's gRPC packages."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    deps = make("cpp-deps", timeout=1200)
    if deps.returncode != 0:
        # Only the toolchain being unobtainable (no apt, no root, no Debian mirror) is a skip.
        why = (deps.stdout + deps.stderr)[-600:]
        pytest.skip(f"the C++ toolchain cannot be installed here: {why}")
    built = make("cpp-client", timeout=1200)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return [str(ROOT / "clients" / "cpp" / "build" / "chatfleet-chat")]


@pytest.fixture(params=["node", "cpp"])
def client(request: pytest.FixtureRequest) -> list[str]:
    command: list[str] = request.getfixturevalue(f"{request.param}_client")
    return command


def run(client: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*client, *args], capture_output=True, text=True, timeout=240, check=False
    )


@pytest.mark.timeout(1500)  # the first run may apt-get install and compile the C++ client
def test_streams_generate_from_the_selected_worker(client: list[str], stack: Stack) -> None:
    args = ["--jsonl", "--temperature", "0", stack.controller_address, CHAT_MODEL, QUESTION, "24"]
    done = run(client, *args)
    assert done.returncode == 0, done.stderr
    # One JSON line per streamed GenerateResponse, printed as it arrived.
    messages = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(messages) >= 3, done.stdout
    pieces = [message.get("text", "") for message in messages]
    assert sum(1 for piece in pieces if piece) >= 2  # the text came in several chunks
    assert "Paris" in "".join(pieces)
    last = messages[-1]
    assert last["finish_reason"] in FINISHED
    assert 0 < int(last["usage"]["completion_tokens"]) <= 24
    assert f"worker: {stack.worker_address} (model {CHAT_MODEL})" in done.stderr


def test_prints_text_and_finish_reason(client: list[str], stack: Stack) -> None:
    done = run(client, "--temperature", "0", stack.controller_address, CHAT_MODEL, QUESTION, "3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    assert "finish_reason: FINISH_REASON_LENGTH" in done.stderr
    assert "completion_tokens: 3" in done.stderr


def test_unknown_model_names_the_served_ones(client: list[str], stack: Stack) -> None:
    done = run(client, stack.controller_address, "no-such-model", "hi", "4")
    assert done.returncode == 1
    assert "model 'no-such-model' is not served" in done.stderr
    assert CHAT_MODEL in done.stderr and EMBEDDING_MODEL in done.stderr


def test_embedding_only_model_is_refused_by_the_worker(client: list[str], stack: Stack) -> None:
    done = run(client, stack.controller_address, EMBEDDING_MODEL, "hi", "4")
    assert done.returncode == 1
    # The worker's status, reported by name, not a crash.
    assert "Generate" in done.stderr and "INVALID_ARGUMENT" in done.stderr


def test_bad_usage_exits_2(client: list[str]) -> None:
    done = run(client, "127.0.0.1:1", CHAT_MODEL, "hi", "zero")
    assert done.returncode == 2
    assert "MAX_TOKENS must be a whole number" in done.stderr and "usage:" in done.stderr
