"""The gateway's OpenAI routes against fake gRPC servers: response and chunk shapes, translation."""

from __future__ import annotations

import base64
import logging
import struct

import pytest
from gateway_fakes import (
    CHAT_MODEL,
    EMBED_MODEL,
    REPLY,
    chat_body,
    fake_fleet,
    gateway_client,
    sse_events,
)

from chatfleet.v1 import worker_pb2

ANSWER = "".join(REPLY)


async def test_models_list_has_openai_shape() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.get("/v1/models")
        one = await client.get(f"/v1/models/{CHAT_MODEL}")
        missing = await client.get("/v1/models/nope")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [card["id"] for card in body["data"]] == [CHAT_MODEL, EMBED_MODEL]
    for card in body["data"]:
        assert card["object"] == "model"
        assert card["owned_by"] == "chatfleet"
        assert isinstance(card["created"], int)
    assert one.json()["id"] == CHAT_MODEL
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


async def test_chat_completion_shape_and_translation() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post(
            "/v1/chat/completions",
            json=chat_body(
                messages=[
                    {"role": "developer", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                ],
                temperature=0.5,
                top_p=0.9,
                stop=["\n", "END"],
                max_completion_tokens=10,
                max_tokens=99,
                presence_penalty=0.5,
                frequency_penalty=-0.5,
                seed=42,
                top_k=5,
                min_p=0.1,
                repetition_penalty=1.1,
                stop_token_ids=[7],
                ignore_eos=True,
                min_tokens=2,
                user="someone",
            ),
            headers={"x-request-id": "req-123"},
        )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "req-123"
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == CHAT_MODEL
    assert isinstance(body["created"], int)
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": ANSWER},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 3,
        "total_tokens": 6,
        "prompt_tokens_details": {"cached_tokens": 0},
    }

    [sent] = fleet.worker.generate_requests
    assert sent.request_id == "req-123"
    assert fleet.worker.metadata[0]["x-request-id"] == "req-123"
    assert sent.WhichOneof("prompt") == "chat"
    assert [(m.role, m.content) for m in sent.chat.messages] == [
        ("system", "Be brief."),
        ("user", "Hi"),
    ]
    assert sent.sampling.temperature == pytest.approx(0.5)
    assert sent.sampling.top_p == pytest.approx(0.9)
    assert sent.sampling.top_k == 5
    assert sent.sampling.min_p == pytest.approx(0.1)
    assert sent.sampling.repetition_penalty == pytest.approx(1.1)
    assert sent.sampling.presence_penalty == pytest.approx(0.5)
    assert sent.sampling.frequency_penalty == pytest.approx(-0.5)
    assert sent.sampling.seed == 42
    assert list(sent.stopping.stop) == ["\n", "END"]
    assert sent.stopping.max_tokens == 10  # max_completion_tokens wins over max_tokens
    assert list(sent.stopping.stop_token_ids) == [7]
    assert sent.stopping.ignore_eos
    assert sent.stopping.min_tokens == 2
    assert not sent.logprobs.enabled


async def test_chat_leaves_unset_sampling_fields_unset() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post("/v1/chat/completions", json=chat_body(stop="END"))
    assert response.status_code == 200
    [sent] = fleet.worker.generate_requests
    for name in ("temperature", "top_p", "top_k", "min_p", "seed", "repetition_penalty"):
        assert not sent.sampling.HasField(name), name
    assert not sent.stopping.HasField("max_tokens")
    assert list(sent.stopping.stop) == ["END"]
    # A generated request id is returned and passed on.
    assert sent.request_id == response.headers["x-request-id"]


async def test_chat_stream_chunks() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == CHAT_MODEL
        assert "usage" not in chunk
    assert chunks[0]["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    contents = [chunk["choices"][0]["delta"].get("content") for chunk in chunks[1:-1]]
    assert "".join(contents) == ANSWER
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-1])
    assert chunks[-1]["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    ]


async def test_chat_stream_include_usage_sends_a_final_usage_chunk() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post(
            "/v1/chat/completions",
            json=chat_body(stream=True, stream_options={"include_usage": True}, max_tokens=2),
        )
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk = events[:-1]
    assert all(chunk["usage"] is None for chunk in chunks)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {
        "prompt_tokens": 6,
        "completion_tokens": 2,
        "total_tokens": 8,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_chat_n_runs_one_call_per_choice_with_consecutive_seeds() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post(
            "/v1/chat/completions",
            json=chat_body(n=2, seed=7),
            headers={"x-request-id": "r"},
        )
        streamed = await client.post("/v1/chat/completions", json=chat_body(n=2, stream=True))
    body = response.json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1]
    assert all(choice["message"]["content"] == ANSWER for choice in body["choices"])
    # The prompt counts once; each choice's completion counts.
    assert body["usage"] == {
        "prompt_tokens": 6,
        "completion_tokens": 6,
        "total_tokens": 12,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    first_two = fleet.worker.generate_requests[:2]
    assert sorted(r.sampling.seed for r in first_two) == [7, 8]
    assert sorted(r.request_id for r in first_two) == ["r-0", "r-1"]

    chunks = sse_events(streamed.text)[:-1]
    roles = [c["choices"][0]["index"] for c in chunks if "role" in c["choices"][0]["delta"]]
    assert roles == [0, 1]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert "".join(choice["delta"].get("content", "") for choice in mine) == ANSWER
        assert mine[-1]["finish_reason"] == "stop"


async def test_chat_logprobs_shape() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post(
            "/v1/chat/completions", json=chat_body(logprobs=True, top_logprobs=2)
        )
        streamed = await client.post(
            "/v1/chat/completions", json=chat_body(logprobs=True, stream=True)
        )
    sent = fleet.worker.generate_requests[0]
    assert sent.logprobs.enabled and sent.logprobs.top_logprobs == 2
    content = response.json()["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in content] == list(REPLY)
    first = content[0]
    assert first == {
        "token": "Hello",
        "logprob": -0.5,
        "bytes": list(b"Hello"),
        "top_logprobs": [
            {"token": "Hello#0", "logprob": -1.0, "bytes": list(b"Hello#0")},
            {"token": "Hello#1", "logprob": -2.0, "bytes": list(b"Hello#1")},
        ],
    }
    chunks = sse_events(streamed.text)[:-1]
    streamed_tokens = [
        entry["token"]
        for chunk in chunks
        if chunk["choices"][0]["logprobs"]
        for entry in chunk["choices"][0]["logprobs"]["content"]
    ]
    assert streamed_tokens == list(REPLY)


async def test_completions_list_prompt_with_echo_and_n() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post(
            "/v1/completions",
            json={"model": CHAT_MODEL, "prompt": ["one two", "three"], "echo": True, "n": 2},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert body["model"] == CHAT_MODEL
    texts = [(choice["index"], choice["text"]) for choice in body["choices"]]
    assert texts == [
        (0, "one two" + ANSWER),
        (1, "one two" + ANSWER),
        (2, "three" + ANSWER),
        (3, "three" + ANSWER),
    ]
    assert all(choice["logprobs"] is None for choice in body["choices"])
    assert all(choice["finish_reason"] == "stop" for choice in body["choices"])
    # Each prompt counts once (2 + 1 words), every choice's completion counts.
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 12,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    sent = fleet.worker.generate_requests
    assert sorted(r.text for r in sent) == ["one two", "one two", "three", "three"]
    assert all(r.echo for r in sent)
    # OpenAI's default for completions.
    assert all(r.stopping.max_tokens == 16 for r in sent)


async def test_completions_token_id_prompts() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        single = await client.post("/v1/completions", json={"model": CHAT_MODEL, "prompt": [1, 2]})
        several = await client.post(
            "/v1/completions", json={"model": CHAT_MODEL, "prompt": [[3], [4, 5]]}
        )
    assert len(single.json()["choices"]) == 1
    assert len(several.json()["choices"]) == 2
    ids = sorted(list(r.token_ids.ids) for r in fleet.worker.generate_requests)
    assert ids == [[1, 2], [3], [4, 5]]


async def test_completions_legacy_logprobs_shape() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post(
            "/v1/completions",
            json={"model": CHAT_MODEL, "prompt": "Hi there", "echo": True, "logprobs": 1},
        )
    logprobs = response.json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["Hi", "there", *REPLY]
    # The first prompt token has no logprob, as in OpenAI's echo.
    assert logprobs["token_logprobs"] == [None, -0.5, -0.5, -0.5, -0.5]
    assert logprobs["top_logprobs"] == [
        None,
        {"there#0": -1.0},
        {"Hello#0": -1.0},
        {" from#0": -1.0},
        {" fake#0": -1.0},
    ]
    assert logprobs["text_offset"] == [0, 2, 8, 13, 18]


async def test_completions_stream() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post(
            "/v1/completions",
            json={
                "model": CHAT_MODEL,
                "prompt": "Hi",
                "stream": True,
                "logprobs": 0,
                "stream_options": {"include_usage": True},
            },
        )
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    *chunks, usage_chunk = events[:-1]
    for chunk in chunks:
        assert chunk["object"] == "text_completion"
        assert chunk["id"].startswith("cmpl-")
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == ANSWER
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None, None, "stop"]
    offsets = [chunk["choices"][0]["logprobs"]["text_offset"] for chunk in chunks]
    assert offsets == [[0], [5], [10]]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 3


async def test_embeddings_float_and_base64() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        floats = await client.post(
            "/v1/embeddings", json={"model": EMBED_MODEL, "input": ["a b", "c"]}
        )
        encoded = await client.post(
            "/v1/embeddings",
            json={"model": EMBED_MODEL, "input": "abcd", "encoding_format": "base64"},
        )
    body = floats.json()
    assert body["object"] == "list"
    assert body["model"] == EMBED_MODEL
    assert body["data"] == [
        {"object": "embedding", "index": 0, "embedding": [0.5, -0.25, 3.0]},
        {"object": "embedding", "index": 1, "embedding": [0.5, -0.25, 1.0]},
    ]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    raw = base64.b64decode(encoded.json()["data"][0]["embedding"])
    assert list(struct.unpack("<3f", raw)) == [0.5, -0.25, 4.0]
    assert [list(r.inputs) for r in fleet.worker.embed_requests] == [["a b", "c"], ["abcd"]]


async def test_unknown_fields_are_logged_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="services.gateway.protocol"):
        async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
            response = await client.post(
                "/v1/chat/completions", json=chat_body(brand_new_option={"x": 1})
            )
    assert response.status_code == 200
    assert "brand_new_option" in caplog.text


async def test_unsafe_request_id_is_replaced() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post(
            "/v1/chat/completions", json=chat_body(), headers={"x-request-id": "bad id\t!"}
        )
    assert response.headers["x-request-id"] != "bad id\t!"
    assert fleet.worker.generate_requests[0].request_id == response.headers["x-request-id"]


async def test_cancelled_generation_finishes_with_abort() -> None:
    async def cancelled(request: worker_pb2.GenerateRequest):  # type: ignore[no-untyped-def]
        yield worker_pb2.GenerateResponse(
            text="Hel", finish_reason=worker_pb2.FINISH_REASON_CANCELLED
        )

    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        fleet.worker.script = cancelled
        response = await client.post("/v1/chat/completions", json=chat_body())
    choice = response.json()["choices"][0]
    assert choice["message"]["content"] == "Hel"
    assert choice["finish_reason"] == "abort"


async def test_completion_offsets_start_after_an_echo_without_logprobs() -> None:
    async def echo_without_logprobs(request: worker_pb2.GenerateRequest):  # type: ignore[no-untyped-def]
        # What the HF worker does: the echo carries text and ids, no prompt logprobs.
        yield worker_pb2.GenerateResponse(text="Hi there", token_ids=[1, 2], is_prompt_echo=True)
        yield worker_pb2.GenerateResponse(
            text="!",
            token_ids=[3],
            logprobs=[worker_pb2.TokenLogprob(token_id=3, token="!", logprob=-0.5)],
            finish_reason=worker_pb2.FINISH_REASON_STOP,
        )

    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        fleet.worker.script = echo_without_logprobs
        response = await client.post(
            "/v1/completions",
            json={"model": CHAT_MODEL, "prompt": "Hi there", "echo": True, "logprobs": 0},
        )
    choice = response.json()["choices"][0]
    assert choice["text"] == "Hi there!"
    assert choice["logprobs"]["tokens"] == ["!"]
    assert choice["logprobs"]["text_offset"] == [8]
