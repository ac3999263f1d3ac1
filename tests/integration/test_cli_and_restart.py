"""The CLI's test-message against a live stack, and recovery from a controller restart."""

from __future__ import annotations

import subprocess
import sys

import openai
import pytest

from tests.integration.conftest import CHAT_MODEL, Stack, service_env

pytestmark = pytest.mark.integration


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=service_env(),
        check=False,
    )


def test_test_message_through_controller(stack: Stack) -> None:
    done = run_cli(
        "test-message",
        "--controller-address", stack.controller_address,
        "--model-name", CHAT_MODEL,
        "--message", "What is the capital of France?",
        "--max-new-tokens", "24",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout
    assert stack.worker_address in done.stdout


def test_test_message_unknown_model_fails_clearly(stack: Stack) -> None:
    done = run_cli(
        "test-message", "--controller-address", stack.controller_address, "--model-name", "nope"
    )
    assert done.returncode == 1
    assert "NOT_FOUND" in done.stderr


def test_cli_help_lists_commands() -> None:
    done = run_cli("--help")
    for command in ("controller", "worker", "gateway", "up", "chat", "test-message"):
        assert command in done.stdout


def test_controller_restart_workers_reregister(stack: Stack) -> None:
    stack.restart_controller()
    # The new controller knows nothing; the worker must register again on its own.
    stack.wait_models_listed()
    client = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="x", max_retries=0)
    reply = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=16,
    )
    assert "Paris" in (reply.choices[0].message.content or "")
