"""`chatfleet chat` in a pseudo terminal against the real stack and the default chat model."""

from __future__ import annotations

import pytest

from tests.integration.conftest import CHAT_MODEL, Stack, service_env
from tests.unit.pty_driver import PtySession, chatfleet

pytestmark = pytest.mark.integration


def test_chat_answers_and_regenerates(stack: Stack) -> None:
    session = PtySession(
        chatfleet(
            "chat", "--url", stack.gateway_url, "--model", CHAT_MODEL,
            "--temperature", "0", "--max-tokens", "32", "--debug",
        ),
        env=service_env(),
    )  # fmt: skip
    try:
        session.expect(r"USER: ")
        session.sendline("What is the capital of France?")
        session.expect(r"ASSISTANT:")
        session.expect(r"Paris", timeout=120)
        session.expect(r"\[debug\] \d+ tokens in [\d.]+ s: [\d.]+ tokens/s", timeout=120)
        # Greedy decoding: the regenerated reply says the same.
        session.expect(r"USER: ")
        session.sendline("!!regen")
        session.expect(r"Paris", timeout=120)
        session.expect(r"USER: ", timeout=120)
        session.sendline("!!exit")
        assert session.wait() == 0
        assert "Traceback" not in session.output
    finally:
        session.close()
