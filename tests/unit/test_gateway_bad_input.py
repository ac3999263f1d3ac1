"""Hostile and oversized request bodies, the context window seen from the edge, and the OpenAPI
document describing the request bodies."""

from __future__ import annotations

import argparse
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from starlette.types import Message

from services.gateway.app import create_app
from services.gateway.config import GatewayConfig, add_arguments
from services.gateway.protocol import MAX_CHOICES, MAX_PROMPTS
from tests.unit.gateway_fakes import (
    CHAT_MODEL,
    EMBED_MODEL,
    chat_body,
    fake_fleet,
    gateway_client,
)
from tests.unit.models import save_tiny_llama
from tests.unit.tiny_worker import TINY_MODEL, TinyWorker, tiny_worker


def assert_error(
    response: Any, status: int, *, param: str | None = None, code: str | None = None
) -> str:
    """Check an OpenAI error response; returns its message."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    message: str = error["message"]
    return message


# --- body size ---------------------------------------------------------------------------------


async def test_body_over_the_limit_is_413_before_reaching_a_worker() -> None:
    async with fake_fleet(max_body_bytes=1000) as fleet, gateway_client(fleet.config) as client:
        big = chat_body(messages=[{"role": "user", "content": "x" * 2000}])
        declared = await client.post("/v1/chat/completions", json=big)

        async def chunks() -> AsyncIterator[bytes]:
            # No Content-Length: the limit is enforced while reading.
            for _ in range(30):
                yield b" " * 100

        streamed = await client.post("/v1/completions", content=chunks())
    message = assert_error(declared, 413, code="request_too_large")
    assert "1000 bytes" in message
    assert "1000 bytes" in assert_error(streamed, 413, code="request_too_large")
    assert fleet.worker.generate_requests == []


async def test_body_at_the_limit_is_accepted() -> None:
    body = b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]}'
    async with fake_fleet(max_body_bytes=len(body)) as fleet, gateway_client(fleet.config) as c:
        response = await c.post("/v1/chat/completions", content=body)
    assert response.status_code == 200, response.text


def test_max_body_bytes_flag_with_env_fallback() -> None:
    def parse(argv: list[str], environ: dict[str, str]) -> GatewayConfig:
        parser = argparse.ArgumentParser()
        add_arguments(parser, environ)
        return GatewayConfig.from_namespace(parser.parse_args(argv))

    environ = {"CHATFLEET_GATEWAY_MAX_BODY_BYTES": "2048"}
    assert parse([], {}).max_body_bytes == GatewayConfig().max_body_bytes == 16 * 1024 * 1024
    assert parse([], environ).max_body_bytes == 2048
    assert parse(["--max-body-bytes=4096"], environ).max_body_bytes == 4096
    with pytest.raises(ValueError, match="--max-body-bytes"):
        parse(["--max-body-bytes=0"], {})


async def test_client_gone_mid_body_is_499_not_a_server_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    messages = [{"type": "http.request", "body": b'{"model": "tiny', "more_body": True}]
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1234),
        "server": ("gateway", 80),
    }
    async with fake_fleet() as fleet:
        app = create_app(fleet.config)
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)
    assert sent[0]["status"] == 499
    assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert fleet.worker.generate_requests == []


# --- unreadable bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'{"model": "tiny-chat\xff", "messages": []}', "not valid UTF-8 (byte 0xff at offset 20)"),
        (b"\xfe\xff\x00{", "not valid UTF-8"),
        (b"", "empty"),
        (b"  \n", "empty"),
        (b'{"model": "x",', "could not parse the JSON"),
        (b'{"model": "a\\ud800"}', "could not parse the JSON"),
        (b"null", "Invalid request body"),
    ],
)
async def test_unreadable_bodies_are_400_saying_why(content: bytes, words: str) -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            response = await client.post(path, content=content)
            assert words in assert_error(response, 400)


# --- fields --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", chat_body(model=7), "model"),
        ("/v1/chat/completions", chat_body(max_tokens=1.5), "max_tokens"),
        ("/v1/chat/completions", chat_body(max_tokens=2**32), "max_tokens"),
        ("/v1/chat/completions", chat_body(seed=2**64), "seed"),
        (
            "/v1/chat/completions",
            chat_body(stream_options={"include_usage": "y"}),
            "stream_options.include_usage",
        ),
        ("/v1/chat/completions", chat_body(stop_token_ids=[-1]), "stop_token_ids[0]"),
        ("/v1/chat/completions", chat_body(messages=[{"content": "x"}]), "messages[0].role"),
        ("/v1/completions", {"model": CHAT_MODEL, "prompt": "x", "n": True}, "n"),
        ("/v1/completions", {"model": CHAT_MODEL, "prompt": [[1, -2]]}, "prompt"),
        ("/v1/completions", {"model": CHAT_MODEL, "prompt": {"text": "x"}}, "prompt"),
        ("/v1/completions", {"model": CHAT_MODEL}, "prompt"),
        ("/v1/embeddings", {"model": EMBED_MODEL, "input": None}, "input"),
        (
            "/v1/embeddings",
            {"model": EMBED_MODEL, "input": "x", "encoding_format": 1},
            "encoding_format",
        ),
    ],
)
async def test_wrong_types_name_the_param(path: str, body: dict[str, Any], param: str) -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post(path, json=body)
    assert_error(response, 400, param=param)


async def test_batches_are_bounded() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        prompts = await client.post(
            "/v1/completions", json={"model": CHAT_MODEL, "prompt": ["x"] * (MAX_PROMPTS + 1)}
        )
        choices = await client.post(
            "/v1/completions",
            json={"model": CHAT_MODEL, "prompt": ["x"] * (MAX_CHOICES // 64 + 1), "n": 64},
        )
        inputs = await client.post(
            "/v1/embeddings", json={"model": EMBED_MODEL, "input": ["x"] * (MAX_PROMPTS + 1)}
        )
    assert f"at most {MAX_PROMPTS} items" in assert_error(prompts, 400, param="prompt")
    assert "n (64)" in assert_error(choices, 400, param="prompt")
    assert_error(inputs, 400, param="input")
    assert fleet.worker.generate_requests == []


async def test_unknown_model_of_retrieve_is_404() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.get("/v1/models/no/such-model")
    assert_error(response, 404, param="model", code="model_not_found")


# --- OpenAPI -----------------------------------------------------------------------------------


def test_openapi_describes_request_bodies_and_errors() -> None:
    schema = create_app(GatewayConfig()).openapi()
    components = schema["components"]["schemas"]
    for path, model in [
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/v1/completions", "CompletionRequest"),
        ("/v1/embeddings", "EmbeddingRequest"),
    ]:
        operation = schema["paths"][path]["post"]
        body = operation["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"}
        assert model in components
        assert {"400", "404", "413", "429"} <= set(operation["responses"])
        assert "422" not in operation["responses"]
    chat = components["ChatCompletionRequest"]
    assert set(chat["required"]) == {"model", "messages"}
    assert "ChatMessageParam" in components and "ContentPart" in components
    refs = _refs(schema)
    assert refs and all(ref.removeprefix("#/components/schemas/") in components for ref in refs)


def test_openapi_documents_the_agent_fields() -> None:
    components = create_app(GatewayConfig()).openapi()["components"]["schemas"]
    chat = components["ChatCompletionRequest"]["properties"]
    completion = components["CompletionRequest"]["properties"]
    for name in ("tools", "tool_choice", "response_format", "logit_bias", "structured_outputs"):
        assert "Not supported" not in str(chat[name]), name
    for name in ("response_format", "structured_outputs", "guided_json", "logit_bias"):
        assert name in completion, name
    assert components["ToolParam"]["required"] == ["type", "function"]
    roles = components["ChatMessageParam"]["properties"]["role"]["enum"]
    assert {"tool", "function"} <= set(roles)
    answer = components["ChatMessage"]["properties"]
    assert {"tool_calls", "reasoning_content"} <= set(answer)


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        own = {node["$ref"]} if isinstance(node.get("$ref"), str) else set()
        return own.union(*(_refs(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_refs(value) for value in node))
    return set()


async def test_openapi_and_docs_are_served() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        document = await client.get("/openapi.json")
        docs = await client.get("/docs")
    assert document.status_code == 200
    assert "ChatCompletionRequest" in document.json()["components"]["schemas"]
    assert docs.status_code == 200


# --- the context window, checked by a real worker -------------------------------------------------

CONTEXT = 64


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), max_positions=CONTEXT)


@pytest.fixture
async def worker(llama_dir: Path) -> AsyncIterator[TinyWorker]:
    async with tiny_worker(llama_dir) as running:
        yield running


async def test_prompt_plus_max_tokens_over_the_context_is_400_with_the_counts(
    worker: TinyWorker,
) -> None:
    assert worker.context_length == CONTEXT
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        fleet.controller.routes[TINY_MODEL] = [worker.address]
        words = "hello " * 10
        chat = await client.post(
            "/v1/chat/completions",
            json=chat_body(
                model=TINY_MODEL, messages=[{"role": "user", "content": words}], max_tokens=60
            ),
        )
        completion = await client.post(
            "/v1/completions", json={"model": TINY_MODEL, "prompt": words, "max_tokens": 60}
        )
        overlong = await client.post(
            "/v1/chat/completions",
            json=chat_body(model=TINY_MODEL, messages=[{"role": "user", "content": words * 10}]),
        )
        overlong_prompt = await client.post(
            "/v1/completions", json={"model": TINY_MODEL, "prompt": [5] * CONTEXT}
        )
    message = assert_error(chat, 400, param="max_tokens")
    assert message.startswith(f"This model's maximum context length is {CONTEXT} tokens.")
    assert "60 in the completion" in message and "in the messages" in message
    assert "60 in the completion" in assert_error(completion, 400, param="max_tokens")
    assert f"context length is {CONTEXT}" in assert_error(overlong, 400, param="messages")
    assert f"resulted in {CONTEXT} tokens" in assert_error(overlong_prompt, 400, param="prompt")


async def test_without_max_tokens_the_answer_is_capped_to_the_context(worker: TinyWorker) -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        fleet.controller.routes[TINY_MODEL] = [worker.address]
        response = await client.post(
            "/v1/chat/completions",
            json=chat_body(
                model=TINY_MODEL,
                messages=[{"role": "user", "content": "hello " * 10}],
                ignore_eos=True,
                temperature=0,
            ),
        )
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["total_tokens"] == CONTEXT
    assert response.json()["choices"][0]["finish_reason"] == "length"
