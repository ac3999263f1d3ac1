"""The gateway on a real uvicorn (port 0): the official openai SDK, client disconnects, serve()."""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import replace

import httpx
import openai
import pytest
from gateway_fakes import (
    CHAT_MODEL,
    EMBED_MODEL,
    REPLY,
    chat_body,
    fake_fleet,
    gateway_server,
    hanging_script,
)
from openai.types.chat import ChatCompletionMessageParam

from services.gateway.main import serve

ANSWER = "".join(REPLY)
MESSAGES: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]


async def test_openai_sdk_against_the_gateway() -> None:
    async with (
        fake_fleet(api_keys=("sk-test",)) as fleet,
        gateway_server(fleet.config) as url,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0) as client,
    ):
        models = await client.models.list()
        assert [model.id for model in models.data] == [CHAT_MODEL, EMBED_MODEL]

        chat = await client.chat.completions.create(
            model=CHAT_MODEL, messages=MESSAGES, n=2, seed=1, logprobs=True, top_logprobs=1
        )
        assert [choice.message.content for choice in chat.choices] == [ANSWER, ANSWER]
        assert chat.choices[0].finish_reason == "stop"
        assert chat.choices[0].logprobs is not None
        assert chat.choices[0].logprobs.content is not None
        assert [entry.token for entry in chat.choices[0].logprobs.content] == list(REPLY)
        assert chat.usage is not None and chat.usage.total_tokens == 12

        stream = await client.chat.completions.create(
            model=CHAT_MODEL,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces = []
        usage = None
        async for chunk in stream:
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk.usage
        assert "".join(pieces) == ANSWER
        assert usage is not None and usage.completion_tokens == len(REPLY)

        completion = await client.completions.create(
            model=CHAT_MODEL, prompt=["a", "b"], echo=True, logprobs=1, max_tokens=2
        )
        assert [choice.text for choice in completion.choices] == [
            "a" + "".join(REPLY[:2]),
            "b" + "".join(REPLY[:2]),
        ]
        assert completion.choices[0].finish_reason == "length"
        assert completion.choices[0].logprobs is not None
        assert completion.choices[0].logprobs.tokens == ["a", *REPLY[:2]]

        # The SDK asks for base64 by default and decodes it.
        embeddings = await client.embeddings.create(model=EMBED_MODEL, input=["xyz", "ab"])
        assert [item.embedding for item in embeddings.data] == [
            [0.5, -0.25, 3.0],
            [0.5, -0.25, 2.0],
        ]
        floats = await client.embeddings.create(
            model=EMBED_MODEL, input="xyz", encoding_format="float"
        )
        assert floats.data[0].embedding == [0.5, -0.25, 3.0]


async def test_openai_sdk_sees_typed_errors() -> None:
    async with (
        fake_fleet(api_keys=("sk-test",)) as fleet,
        gateway_server(fleet.config) as url,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0) as client,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as intruder,
    ):
        with pytest.raises(openai.NotFoundError) as not_found:
            await client.chat.completions.create(model="nope", messages=MESSAGES)
        assert not_found.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=MESSAGES, stream=True)
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, temperature=9)
        assert bad.value.param == "temperature"
        with pytest.raises(openai.AuthenticationError):
            await intruder.models.list()


async def test_client_disconnect_mid_stream_cancels_the_worker_call() -> None:
    async with fake_fleet() as fleet, gateway_server(fleet.config) as url:
        fleet.worker.script = hanging_script(after=1)
        async with (
            httpx.AsyncClient(base_url=url) as client,
            client.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as response,
        ):
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if REPLY[0] in line:
                    break  # got the first piece; now hang up
        # Leaving the blocks closed the connection; the gateway must cancel the gRPC call.
        await asyncio.wait_for(fleet.worker.generate_cancelled.wait(), timeout=10)


async def test_client_disconnect_while_waiting_cancels_the_worker_call() -> None:
    async with fake_fleet() as fleet, gateway_server(fleet.config) as url:
        fleet.worker.script = hanging_script()
        async with httpx.AsyncClient(base_url=url) as client:
            request = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body()))
            await asyncio.wait_for(fleet.worker.generate_started.wait(), timeout=10)
            request.cancel()
            with pytest.raises(asyncio.CancelledError):
                await request
        await asyncio.wait_for(fleet.worker.generate_cancelled.wait(), timeout=10)


async def test_serve_listens_logs_and_stops_on_cancel(caplog: pytest.LogCaptureFixture) -> None:
    async with fake_fleet(port=0) as fleet:
        ready = asyncio.Event()
        with caplog.at_level(logging.INFO, logger="services.gateway.main"):
            task = asyncio.create_task(serve(fleet.config, ready=ready))
            await asyncio.wait_for(ready.wait(), timeout=10)
            match = re.search(r"listening on (http://127\.0\.0\.1:(\d+))", caplog.text)
            assert match is not None and int(match.group(2)) > 0
            async with httpx.AsyncClient(base_url=match.group(1)) as client:
                health = await client.get("/health")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert health.status_code == 200
    assert "gateway stopped" in caplog.text


async def test_serve_fails_clearly_on_a_busy_port() -> None:
    async with fake_fleet(port=0) as fleet, gateway_server(fleet.config) as url:
        port = int(url.rsplit(":", 1)[1])
        with pytest.raises(OSError):
            await serve(replace(fleet.config, port=port))
