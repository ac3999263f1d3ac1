"""Nothing secret in any process's log at INFO: no prompt, no completion, no API key, no gRPC
token, also when a request fails."""

from __future__ import annotations

import httpx
import pytest

from tests.chaos.fleet import API_KEY, GRPC_TOKEN, Fleet
from tests.chaos.traffic import chat

pytestmark = pytest.mark.integration


async def test_logs_hold_no_prompt_completion_or_secret(
    fleet: Fleet, client: httpx.AsyncClient
) -> None:
    prompt = "Please repeat the word aardvark-zeppelin-7731."
    wrong_key = "sk-wrong-key-marker-5150"
    completions = []
    for stream in (False, True):
        outcome = await chat(client, prompt, max_tokens=24, stream=stream)
        assert outcome.ok, outcome
        completions.append(outcome.content)
    refused = await client.post(
        "/v1/chat/completions",
        json={"model": "x", "messages": [{"role": "user", "content": prompt}]},
        headers={"Authorization": f"Bearer {wrong_key}"},
    )
    assert refused.status_code == 401
    logs = {path.name: path.read_text(errors="replace") for path in fleet.log_dir.glob("*.log")}
    assert logs
    secrets = [prompt, "aardvark-zeppelin", API_KEY, GRPC_TOKEN, wrong_key]
    secrets += [text for text in completions if len(text) >= 20]
    for name, text in logs.items():
        for secret in secrets:
            assert secret not in text, f"{name} logs {secret!r}"
