"""Prefix caching on the default model, through the session's stack: a request whose prompt the
worker has cached answers exactly as it did cold, and the gateway reports the cached tokens in
OpenAI's usage fields (chat, completions, responses).

The worker's engine replicas take requests in turn (the least busy first), so a prompt sent more
times than there are replicas is seen again by one of them: that is what `REPEATS` is for. The
exact cached counts, eviction and cancellation are unit-tested on a tiny model.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.integration.conftest import CHAT_MODEL, Stack

pytestmark = pytest.mark.integration

REPEATS = 5
# Unique to this module, so nothing else in the session has cached it.
SYSTEM = (
    "You are a careful assistant for the Skerryvore lighthouse museum (prefix-cache test). "
    "Visitors ask about the history of lighthouses, the lives of their keepers, lenses, fog "
    "signals and famous shipwrecks. Answer briefly and politely, and say so when you do not know. "
) * 3


def post(client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = client.post(path, json={"model": CHAT_MODEL, "temperature": 0, **body})
    assert reply.status_code == 200, reply.text
    result: dict[str, Any] = reply.json()
    return result


def test_a_cached_conversation_answers_as_it_did_cold(stack: Stack) -> None:
    first_turn = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Who kept the first lighthouse?"},
    ]
    second_turn = [
        *first_turn,
        {"role": "assistant", "content": "The keepers of the Pharos of Alexandria, long ago."},
        {"role": "user", "content": "What is a Fresnel lens?"},
    ]
    body = {"messages": second_turn, "max_tokens": 16}
    with httpx.Client(base_url=stack.gateway_url, timeout=120) as client:
        cold = post(client, "/v1/chat/completions", body)
        assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        post(client, "/v1/chat/completions", {"messages": first_turn, "max_tokens": 4})
        warm = [post(client, "/v1/chat/completions", body) for _ in range(REPEATS)]
    answer = cold["choices"][0]["message"]["content"]
    assert [w["choices"][0]["message"]["content"] for w in warm] == [answer] * REPEATS
    cached = [w["usage"]["prompt_tokens_details"]["cached_tokens"] for w in warm]
    prompt_tokens = cold["usage"]["prompt_tokens"]
    # Seen again: all of the prompt comes from the cache but its last token, or the last
    # block when the answer ended before filling it.
    assert prompt_tokens - 16 <= max(cached) < prompt_tokens


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": SYSTEM + "What is a fog signal?", "max_tokens": 2}),
        (
            "/v1/responses",
            {"instructions": SYSTEM, "input": "Name a shipwreck.", "max_output_tokens": 2},
        ),
    ],
)
def test_completions_and_responses_report_cached_tokens(
    stack: Stack, path: str, body: dict[str, Any]
) -> None:
    with httpx.Client(base_url=stack.gateway_url, timeout=120) as client:
        usages = [post(client, path, body)["usage"] for _ in range(REPEATS)]
    if path == "/v1/responses":
        cached = [u["input_tokens_details"]["cached_tokens"] for u in usages]
        prompt_tokens = usages[0]["input_tokens"]
    else:
        cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usages]
        prompt_tokens = usages[0]["prompt_tokens"]
    # The two tokens answered leave the prompt's last block unfilled: it is computed each time.
    assert prompt_tokens - 16 <= max(cached) < prompt_tokens
