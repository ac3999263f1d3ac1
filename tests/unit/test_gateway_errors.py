"""Every way a gateway request fails, and the OpenAI error each becomes; auth; worker retries."""

from __future__ import annotations

import socket
from dataclasses import replace
from typing import Any

import grpc
import pytest
from gateway_fakes import (
    CHAT_MODEL,
    EMBED_MODEL,
    REPLY,
    chat_body,
    failing_script,
    fake_fleet,
    gateway_client,
    hanging_script,
    sse_events,
)

from services.common.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    OverloadedError,
    UnavailableError,
)
from services.gateway.errors import error_for_status, from_validation_errors
from services.gateway.protocol import REQUEST_FIELD_NAMES


def assert_error(body: dict[str, Any], *, type: str, param: str | None, code: str | None) -> None:
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert (error["type"], error["param"], error["code"]) == (type, param, code)


@pytest.mark.parametrize(
    ("code", "status", "kind", "openai_code"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400, "invalid_request_error", None),
        (grpc.StatusCode.UNAUTHENTICATED, 401, "invalid_request_error", "invalid_api_key"),
        (grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error", "model_not_found"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error", "rate_limit_exceeded"),
        (grpc.StatusCode.UNAVAILABLE, 503, "server_error", "service_unavailable"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "server_error", "timeout"),
        (grpc.StatusCode.INTERNAL, 500, "server_error", None),
        (grpc.StatusCode.UNKNOWN, 500, "server_error", None),
        (grpc.StatusCode.FAILED_PRECONDITION, 500, "server_error", None),
    ],
)
def test_status_table(
    code: grpc.StatusCode, status: int, kind: str, openai_code: str | None
) -> None:
    error = error_for_status(code, "boom")
    assert (error.status_code, error.type, error.code) == (status, kind, openai_code)
    assert ("Retry-After" in error.headers) == (status == 429)


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        (("messages", 0, "role"), "messages[0].role"),
        (("messages", 0, "content", "list[ContentPart]", 1, "type"), "messages[0].content"),
        (("stop", "list[str]", 2), "stop"),
        ((), None),
    ],
)
def test_validation_error_param_stops_at_unions(loc: tuple[Any, ...], param: str | None) -> None:
    error = from_validation_errors(
        [{"type": "string_type", "loc": loc, "msg": "Input should be a valid string"}],
        REQUEST_FIELD_NAMES,
    )
    assert (error.status_code, error.param) == (400, param)


async def test_unknown_model_is_404_model_not_found() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        chat = await client.post("/v1/chat/completions", json=chat_body(model="nope"))
        # Streams are primed: the failure comes before any byte of the stream.
        stream = await client.post(
            "/v1/chat/completions", json=chat_body(model="nope", stream=True)
        )
        completion = await client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
        embedding = await client.post("/v1/embeddings", json={"model": "nope", "input": "x"})
    for response in (chat, stream, completion, embedding):
        assert response.status_code == 404
        assert_error(
            response.json(), type="invalid_request_error", param=None, code="model_not_found"
        )
        assert response.headers["x-request-id"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat_body(temperature=5), "temperature"),
        (chat_body(temperature="hot"), "temperature"),
        (chat_body(top_p=0), "top_p"),
        (chat_body(n=0), "n"),
        (chat_body(n="two"), "n"),
        (chat_body(stream="yes"), "stream"),
        (chat_body(max_tokens=-1), "max_tokens"),
        (chat_body(top_logprobs=50, logprobs=True), "top_logprobs"),
        (chat_body(top_logprobs=2), "top_logprobs"),
        (chat_body(stop=5), "stop"),
        (chat_body(messages="hi"), "messages"),
        (chat_body(messages=[]), "messages"),
        (chat_body(messages=[{"role": "robot", "content": "x"}]), "messages[0].role"),
        (chat_body(messages=[{"role": "user", "content": 3}]), "messages[0].content"),
        (
            chat_body(
                messages=[
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "look"},
                            {"type": "image_url", "image_url": {"url": "http://x/y.png"}},
                        ],
                    }
                ]
            ),
            "messages[0].content[1].type",
        ),
        (chat_body(messages=[{"role": "tool", "content": "x"}]), "messages[0].tool_call_id"),
        (chat_body(tools=[{"type": "web_search"}]), "tools[0].type"),
        (chat_body(tool_choice="auto"), "tool_choice"),
        (
            chat_body(
                functions=[{"name": "f"}], tools=[{"type": "function", "function": {"name": "g"}}]
            ),
            "functions",
        ),
        (chat_body(response_format={"type": "xml"}), "response_format"),
        (chat_body(logit_bias={"a": 1}), "logit_bias"),
        (chat_body(audio={"voice": "alloy"}), "audio"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)
async def test_bad_chat_requests_are_400_naming_the_param(body: dict[str, Any], param: str) -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert_error(response.json(), type="invalid_request_error", param=param, code=None)
    assert fleet.worker.generate_requests == []


async def test_accepted_neutral_values_of_unsupported_fields() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post(
            "/v1/chat/completions",
            json=chat_body(
                tools=[], tool_choice="none", response_format={"type": "text"}, logit_bias={}
            ),
        )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"model": CHAT_MODEL, "prompt": "x", "suffix": "y"}, "suffix"),
        ("/v1/completions", {"model": CHAT_MODEL, "prompt": "x", "best_of": 3}, "best_of"),
        ("/v1/completions", {"model": CHAT_MODEL, "prompt": []}, "prompt"),
        ("/v1/completions", {"model": CHAT_MODEL, "prompt": [1, "a"]}, "prompt"),
        ("/v1/completions", {"model": CHAT_MODEL, "prompt": [[]]}, "prompt[0]"),
        ("/v1/completions", {"model": CHAT_MODEL, "prompt": "x", "logprobs": 21}, "logprobs"),
        ("/v1/embeddings", {"model": EMBED_MODEL, "input": [1, 2]}, "input"),
        ("/v1/embeddings", {"model": EMBED_MODEL, "input": [[1, 2]]}, "input"),
        ("/v1/embeddings", {"model": EMBED_MODEL, "input": []}, "input"),
        ("/v1/embeddings", {"model": EMBED_MODEL, "input": "x", "dimensions": 8}, "dimensions"),
        (
            "/v1/embeddings",
            {"model": EMBED_MODEL, "input": "x", "encoding_format": "int8"},
            "encoding_format",
        ),
    ],
)
async def test_bad_completion_and_embedding_requests(
    path: str, body: dict[str, Any], param: str
) -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post(path, json=body)
    assert response.status_code == 400, response.text
    assert_error(response.json(), type="invalid_request_error", param=param, code=None)


@pytest.mark.parametrize("content", [b'{"model": "x", ', b"", b"\xff\xfe", b"[1, 2]"])
async def test_malformed_bodies_are_400(content: bytes) -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post(
            "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    assert_error(response.json(), type="invalid_request_error", param=None, code=None)


async def test_body_without_json_content_type_is_still_read() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post(
            "/v1/chat/completions",
            content=b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "x"}]}',
            headers={"content-type": "application/x-www-form-urlencoded"},
        )
    assert response.status_code == 200


async def test_worker_invalid_argument_keeps_its_param() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        fleet.worker.script = failing_script(
            InvalidRequestError("prompt is longer than the context", param="messages")
        )
        response = await client.post("/v1/chat/completions", json=chat_body())
    assert response.status_code == 400
    assert_error(response.json(), type="invalid_request_error", param="messages", code=None)
    assert "longer than the context" in response.json()["error"]["message"]


async def test_overloaded_worker_is_429_with_retry_after() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        fleet.worker.script = failing_script(OverloadedError("queue full"))
        fleet.worker.embed_error = OverloadedError("queue full")
        chat = await client.post("/v1/chat/completions", json=chat_body(stream=True))
        embedding = await client.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": "x"})
    for response in (chat, embedding):
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1
        assert_error(
            response.json(), type="rate_limit_error", param=None, code="rate_limit_exceeded"
        )


async def test_no_healthy_worker_is_503() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        fleet.controller.select_error = UnavailableError("no healthy worker serves tiny-chat")
        response = await client.post("/v1/chat/completions", json=chat_body())
    assert response.status_code == 503
    assert_error(response.json(), type="server_error", param=None, code="service_unavailable")


async def test_unexpected_worker_failure_is_500() -> None:
    async def broken(request: Any) -> Any:
        raise RuntimeError("bug")
        yield  # an async generator

    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        fleet.worker.script = broken
        response = await client.post("/v1/chat/completions", json=chat_body())
    assert response.status_code == 500
    assert_error(response.json(), type="server_error", param=None, code=None)


async def test_deadline_is_504_and_cancels_the_worker_call() -> None:
    async with fake_fleet(request_timeout_seconds=0.3) as fleet:
        async with gateway_client(fleet.config) as client:
            fleet.worker.script = hanging_script()
            response = await client.post("/v1/chat/completions", json=chat_body())
        await fleet.worker.generate_cancelled.wait()
    assert response.status_code == 504
    assert_error(response.json(), type="server_error", param=None, code="timeout")


async def test_retries_another_worker_when_the_chosen_one_is_unavailable() -> None:
    async with fake_fleet(workers=2) as fleet, gateway_client(fleet.config) as client:
        first, second = fleet.workers
        first.script = failing_script(UnavailableError("draining"))
        first.embed_error = UnavailableError("draining")
        chat = await client.post("/v1/chat/completions", json=chat_body())
        embedding = await client.post("/v1/embeddings", json={"model": EMBED_MODEL, "input": "x"})
    assert chat.status_code == 200
    assert chat.json()["choices"][0]["message"]["content"] == "".join(REPLY)
    assert embedding.status_code == 200
    assert len(first.generate_requests) == 1 and len(second.generate_requests) == 1
    assert len(first.embed_requests) == 1 and len(second.embed_requests) == 1
    excluded = [list(r.exclude_addresses) for r in fleet.controller.select_requests]
    assert excluded == [[], [first.address], [], [first.address]]


async def test_retries_are_bounded() -> None:
    async with fake_fleet(workers=2, worker_retries=1) as fleet:
        async with gateway_client(fleet.config) as client:
            for worker in fleet.workers:
                worker.script = failing_script(UnavailableError("draining"))
            response = await client.post("/v1/chat/completions", json=chat_body())
    assert response.status_code == 503
    assert len(fleet.controller.select_requests) == 2


async def test_unavailable_after_output_is_not_retried_and_ends_the_stream_with_an_error() -> None:
    async with fake_fleet(workers=2) as fleet, gateway_client(fleet.config) as client:
        fleet.workers[0].script = failing_script(UnavailableError("worker died"), after=1)
        response = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    error_event = events[-2]
    assert_error(error_event, type="server_error", param=None, code="service_unavailable")
    assert events[1]["choices"][0]["delta"]["content"] == REPLY[0]
    assert fleet.workers[1].generate_requests == []


async def test_mid_stream_error_of_completions_is_an_sse_error_event() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        fleet.worker.script = failing_script(OverloadedError("evicted"), after=2)
        response = await client.post(
            "/v1/completions", json={"model": CHAT_MODEL, "prompt": "x", "stream": True}
        )
    events = sse_events(response.text)
    assert [e["choices"][0]["text"] for e in events[:2]] == list(REPLY[:2])
    assert_error(events[2], type="rate_limit_error", param=None, code="rate_limit_exceeded")
    assert events[3:] == ["[DONE]"]


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret-1"}, {"Authorization": ""}],
)
async def test_api_key_required_when_configured(headers: dict[str, str]) -> None:
    async with fake_fleet(api_keys=("secret-1", "secret-2")) as fleet:
        async with gateway_client(fleet.config) as client:
            for method, path in [
                ("GET", "/v1/models"),
                ("POST", "/v1/chat/completions"),
                ("POST", "/v1/completions"),
                ("POST", "/v1/embeddings"),
            ]:
                response = await client.request(method, path, headers=headers, json=chat_body())
                assert response.status_code == 401, path
                assert_error(
                    response.json(),
                    type="invalid_request_error",
                    param=None,
                    code="invalid_api_key",
                )
                assert response.headers["x-request-id"]
    assert fleet.worker.generate_requests == []


async def test_valid_api_keys_and_open_health() -> None:
    async with fake_fleet(api_keys=("secret-1", "secret-2")) as fleet:
        async with gateway_client(fleet.config) as client:
            health = await client.get("/health")
            for key in ("secret-1", "secret-2"):
                response = await client.get(
                    "/v1/models", headers={"Authorization": f"Bearer {key}"}
                )
                assert response.status_code == 200
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}


async def test_health_is_503_when_the_controller_is_not_serving() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        await fleet.controller_server.set_serving(False)
        response = await client.get("/health")
    assert response.status_code == 503


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_controller_is_503() -> None:
    async with fake_fleet() as fleet:
        config = replace(fleet.config, controller_address=f"127.0.0.1:{_unused_port()}")
        async with gateway_client(config) as client:
            health = await client.get("/health")
            models = await client.get("/v1/models")
    assert health.status_code == 503
    assert models.status_code == 503
    assert_error(models.json(), type="server_error", param=None, code="service_unavailable")


async def test_unknown_route_is_an_openai_404() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert_error(response.json(), type="invalid_request_error", param=None, code=None)


async def test_list_models_failure_maps_too() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        fleet.controller.list_error = ModelNotFoundError("gone")
        response = await client.get("/v1/models")
    assert response.status_code == 404
