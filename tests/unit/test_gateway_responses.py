"""POST /v1/responses against fake gRPC servers: the official openai SDK (create and stream), the
GenerateRequest it becomes, and the 400s of requests it cannot serve."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import openai
import pytest
from gateway_fakes import (
    CHAT_MODEL,
    REPLY,
    Fleet,
    agent_script,
    failing_script,
    fake_fleet,
    gateway_client,
    gateway_server,
    hanging_script,
)
from pydantic import BaseModel

from chatfleet.v1 import worker_pb2
from services.common.errors import InvalidRequestError
from services.gateway.responses import to_generate_request
from services.gateway.responses_protocol import ResponsesRequest

ANSWER = "".join(REPLY)
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
# Earlier turns, as a client replays them (the SDK's param types are too narrow for a literal).
HISTORY: list[Any] = [
    {"role": "developer", "content": "Answer in English."},
    {"role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
    {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "Hello!", "annotations": []}],
    },
    {"role": "user", "content": "Capital of France?"},
]
TOOLS: list[Any] = [WEATHER_TOOL]
CITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}


@asynccontextmanager
async def sdk_client(fleet: Fleet) -> AsyncIterator[openai.AsyncOpenAI]:
    async with (
        gateway_server(fleet.config) as url,
        openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="sk-test", max_retries=0) as client,
    ):
        yield client


def chat_of(request: worker_pb2.GenerateRequest) -> list[tuple[str, str]]:
    return [(message.role, message.content) for message in request.chat.messages]


# --- the SDK, not streamed -----------------------------------------------------------------------


async def test_create_plain_text() -> None:
    async with fake_fleet() as fleet, sdk_client(fleet) as client:
        response = await client.responses.create(
            model=CHAT_MODEL, input="What is the capital of France?"
        )
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status == "completed"
    assert response.model == CHAT_MODEL
    assert response.output_text == ANSWER
    [message] = response.output
    assert message.type == "message"
    assert message.id.startswith("msg_")
    assert message.role == "assistant"
    assert message.status == "completed"
    [part] = message.content
    assert part.type == "output_text"
    assert (part.text, part.annotations) == (ANSWER, [])
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (6, 3)
    assert response.usage.total_tokens == 9
    assert response.usage.input_tokens_details.cached_tokens == 0
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    assert response.incomplete_details is None
    assert response.tools == []
    assert response.tool_choice == "auto"
    assert response.parallel_tool_calls is True

    [sent] = fleet.worker.generate_requests
    assert chat_of(sent) == [("user", "What is the capital of France?")]
    assert not sent.HasField("constraint")
    assert not sent.HasField("tool_choice")
    assert not sent.stopping.HasField("max_tokens")
    assert not sent.sampling.HasField("temperature")


async def test_create_with_instructions_and_settings() -> None:
    async with fake_fleet() as fleet, sdk_client(fleet) as client:
        response = await client.responses.create(
            model=CHAT_MODEL,
            instructions="Be brief.",
            input=HISTORY,
            temperature=0.5,
            top_p=0.9,
            max_output_tokens=50,
            metadata={"session": "s1"},
            user="someone",
            store=False,
        )
    assert response.output_text == ANSWER
    assert response.instructions == "Be brief."
    assert response.temperature == pytest.approx(0.5)
    assert response.top_p == pytest.approx(0.9)
    assert response.max_output_tokens == 50
    assert response.metadata == {"session": "s1"}
    [sent] = fleet.worker.generate_requests
    assert chat_of(sent) == [
        ("system", "Be brief."),
        ("system", "Answer in English."),
        ("user", "Hi"),
        ("assistant", "Hello!"),
        ("user", "Capital of France?"),
    ]
    assert sent.sampling.temperature == pytest.approx(0.5)
    assert sent.sampling.top_p == pytest.approx(0.9)
    assert sent.stopping.max_tokens == 50


async def test_create_with_function_tools_gives_function_call_items() -> None:
    arguments = json.dumps({"city": "Paris"})
    async with fake_fleet() as fleet, sdk_client(fleet) as client:
        fleet.worker.script = agent_script(
            reasoning="The user wants weather.", calls=(("get_weather", arguments),)
        )
        response = await client.responses.create(
            model=CHAT_MODEL,
            input="Weather in Paris?",
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=False,
        )
    assert response.status == "completed"
    assert [item.type for item in response.output] == ["reasoning", "function_call"]
    reasoning, call = response.output
    assert reasoning.type == "reasoning"
    assert reasoning.id.startswith("rs_")
    assert reasoning.summary == []
    assert reasoning.content is not None
    assert [part.text for part in reasoning.content] == ["The user wants weather. "]
    assert call.type == "function_call"
    assert call.id is not None and call.id.startswith("fc_")
    assert (call.call_id, call.name, call.arguments) == ("call_0", "get_weather", arguments)
    assert call.status == "completed"
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert response.output_text == ""
    assert response.tool_choice == "required"
    assert response.parallel_tool_calls is False
    [tool] = response.tools
    assert tool.type == "function"
    assert tool.name == "get_weather"
    assert tool.parameters == WEATHER_TOOL["parameters"]

    [sent] = fleet.worker.generate_requests
    [definition] = sent.chat.tools
    assert definition.name == "get_weather"
    assert definition.description == "The weather in a city."
    assert json.loads(definition.parameters_json) == WEATHER_TOOL["parameters"]
    assert definition.strict
    assert sent.tool_choice.mode == worker_pb2.TOOL_CHOICE_MODE_REQUIRED
    assert sent.tool_choice.HasField("parallel_tool_calls")
    assert not sent.tool_choice.parallel_tool_calls


async def test_create_with_json_schema_text_format() -> None:
    async with fake_fleet() as fleet, sdk_client(fleet) as client:
        fleet.worker.script = agent_script(text='{"city": "Paris"}')
        response = await client.responses.create(
            model=CHAT_MODEL,
            input="Which city is the capital of France?",
            text={
                "format": {
                    "type": "json_schema",
                    "name": "city",
                    "schema": CITY_SCHEMA,
                    "strict": True,
                }
            },
        )
    assert json.loads(response.output_text) == {"city": "Paris"}
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"
    [sent] = fleet.worker.generate_requests
    assert sent.constraint.WhichOneof("kind") == "json_schema"
    assert json.loads(sent.constraint.json_schema) == CITY_SCHEMA


class City(BaseModel):
    city: str


async def test_parse_with_a_pydantic_text_format() -> None:
    async with fake_fleet() as fleet, sdk_client(fleet) as client:
        fleet.worker.script = agent_script(text='{"city": "Paris"}')
        response = await client.responses.parse(
            model=CHAT_MODEL, input="Capital of France?", text_format=City
        )
    assert response.output_parsed == City(city="Paris")
    [sent] = fleet.worker.generate_requests
    assert json.loads(sent.constraint.json_schema)["properties"]["city"]["type"] == "string"


async def test_max_output_tokens_reached_is_incomplete() -> None:
    async with fake_fleet() as fleet, sdk_client(fleet) as client:
        response = await client.responses.create(model=CHAT_MODEL, input="Hi", max_output_tokens=2)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "".join(REPLY[:2])
    [message] = response.output
    assert message.type == "message" and message.status == "incomplete"


# --- the SDK, streamed ---------------------------------------------------------------------------


async def test_stream_text_events_in_order() -> None:
    async with fake_fleet() as fleet, sdk_client(fleet) as client:
        async with client.responses.stream(model=CHAT_MODEL, input="Hi") as stream:
            events = [event async for event in stream]
            final = await stream.get_final_response()
    types = [event.type for event in events]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(REPLY),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert deltas == list(REPLY)
    assert final.output_text == "".join(deltas) == ANSWER
    assert final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens == len(REPLY)
    created = events[0]
    assert created.type == "response.created"
    assert created.response.status == "in_progress"
    assert created.response.id == final.id


async def test_stream_reasoning_text_and_tool_calls() -> None:
    async with fake_fleet() as fleet, sdk_client(fleet) as client:
        fleet.worker.script = agent_script(
            reasoning="Two cities.",
            text="Checking.",
            calls=(("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Rome"}')),
        )
        async with client.responses.stream(
            model=CHAT_MODEL,
            input="Weather in Paris and Rome?",
            tools=TOOLS,
        ) as stream:
            events = [event async for event in stream]
            final = await stream.get_final_response()
    types = [event.type for event in events]
    call_events = [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    assert types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        *call_events,
        *call_events,
        "response.completed",
    ]
    assert [item.type for item in final.output] == [
        "reasoning",
        "message",
        "function_call",
        "function_call",
    ]
    assert final.output_text == "Checking."
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(call.call_id, json.loads(call.arguments)) for call in calls] == [
        ("call_0", {"city": "Paris"}),
        ("call_1", {"city": "Rome"}),
    ]
    output_indexes = [
        event.output_index for event in events if event.type == "response.output_item.added"
    ]
    assert output_indexes == [0, 1, 2, 3]
    [sent] = fleet.worker.generate_requests
    assert sent.tool_choice.mode == worker_pb2.TOOL_CHOICE_MODE_AUTO
    assert not sent.tool_choice.HasField("parallel_tool_calls")


async def test_stream_failure_after_start_is_an_error_event() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        fleet.worker.script = failing_script(InvalidRequestError("boom", param="x"), after=1)
        response = await client.post(
            "/v1/responses", json={"model": CHAT_MODEL, "input": "Hi", "stream": True}
        )
    assert response.status_code == 200
    events = _sse(response.text)
    assert [name for name, _ in events][-3:] == [
        "response.content_part.added",
        "response.output_text.delta",
        "error",
    ]
    _, error = events[-1]
    assert error == {
        "type": "error",
        "sequence_number": len(events) - 1,
        "code": None,
        "message": "boom",
        "param": "x",
    }


async def test_stream_early_failure_is_a_plain_http_error() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        fleet.worker.script = failing_script(InvalidRequestError("bad schema", param="constraint"))
        response = await client.post(
            "/v1/responses",
            json={
                "model": CHAT_MODEL,
                "input": "Hi",
                "stream": True,
                "text": {"format": {"type": "json_object"}},
            },
        )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "text.format"
    [sent] = fleet.worker.generate_requests
    assert sent.constraint.json_object


async def test_client_disconnect_mid_stream_cancels_the_worker_call() -> None:
    async with fake_fleet() as fleet, gateway_server(fleet.config) as url:
        fleet.worker.script = hanging_script(after=1)
        body = {"model": CHAT_MODEL, "input": "Hi", "stream": True}
        async with (
            httpx.AsyncClient(base_url=url) as client,
            client.stream("POST", "/v1/responses", json=body) as response,
        ):
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if "response.output_text.delta" in line:
                    break  # got the first piece; now hang up
        # Leaving the blocks closed the connection; the gateway must cancel the gRPC call.
        await asyncio.wait_for(fleet.worker.generate_cancelled.wait(), timeout=10)


def _sse(body: str) -> list[tuple[str, Any]]:
    """(event name, data) of each event of a Responses stream; the name must match data.type."""
    events = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        data = json.loads(lines["data"])
        assert lines["event"] == data["type"]
        events.append((lines["event"], data))
    return events


# --- translation ---------------------------------------------------------------------------------


def test_function_call_items_become_assistant_and_tool_turns() -> None:
    request = ResponsesRequest.model_validate(
        {
            "model": CHAT_MODEL,
            "input": [
                {"role": "user", "content": "Weather in Paris and Rome?"},
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {
                    "type": "function_call",
                    "id": "fc_1",
                    "call_id": "call_a",
                    "name": "get_weather",
                    "arguments": '{"city": "Paris"}',
                    "status": "completed",
                },
                {
                    "type": "function_call",
                    "call_id": "call_b",
                    "name": "get_weather",
                    "arguments": '{"city": "Rome"}',
                },
                {"type": "function_call_output", "call_id": "call_a", "output": "Sunny"},
                {
                    "type": "function_call_output",
                    "call_id": "call_b",
                    "output": [{"type": "input_text", "text": "Rainy"}],
                },
            ],
            "tools": [{**WEATHER_TOOL, "strict": None}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_object"}},
        }
    )
    sent = to_generate_request(request)
    messages = list(sent.chat.messages)
    assert [(m.role, m.content) for m in messages] == [
        ("user", "Weather in Paris and Rome?"),
        ("assistant", ""),
        ("tool", "Sunny"),
        ("tool", "Rainy"),
    ]
    assert [(c.id, c.name, c.arguments) for c in messages[1].tool_calls] == [
        ("call_a", "get_weather", '{"city": "Paris"}'),
        ("call_b", "get_weather", '{"city": "Rome"}'),
    ]
    assert [(m.tool_call_id, m.name) for m in messages[2:]] == [
        ("call_a", "get_weather"),
        ("call_b", "get_weather"),
    ]
    # The Responses API makes function tools strict unless told otherwise.
    assert sent.chat.tools[0].strict
    assert sent.tool_choice.mode == worker_pb2.TOOL_CHOICE_MODE_NAMED
    assert sent.tool_choice.name == "get_weather"
    assert sent.constraint.json_object


def test_function_call_after_assistant_text_joins_that_turn() -> None:
    request = ResponsesRequest.model_validate(
        {
            "model": CHAT_MODEL,
            "input": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Let me check."},
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            ],
        }
    )
    [_, assistant] = to_generate_request(request).chat.messages
    assert (assistant.role, assistant.content) == ("assistant", "Let me check.")
    assert [call.id for call in assistant.tool_calls] == ["c"]


def test_tool_choice_none_and_text_format_text() -> None:
    request = ResponsesRequest.model_validate(
        {
            "model": CHAT_MODEL,
            "input": "Hi",
            "tools": [WEATHER_TOOL],
            "tool_choice": "none",
            "text": {"format": {"type": "text"}},
        }
    )
    sent = to_generate_request(request)
    assert sent.tool_choice.mode == worker_pb2.TOOL_CHOICE_MODE_NONE
    assert not sent.HasField("constraint")


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"background": True}, "background"),
        ({"tools": [WEATHER_TOOL, {"type": "web_search"}]}, "tools[1].type"),
        ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools[0].name"),
        ({"tools": [{"type": "function"}]}, "tools[0].name"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "name": "nope"}},
            "tool_choice.name",
        ),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "file_search"}}, "tool_choice.type"),
        (
            {"text": {"format": {"type": "json_schema", "name": "x", "schema": "not an object"}}},
            "text.format.schema",
        ),
        ({"text": {"format": {"type": "json_schema", "schema": CITY_SCHEMA}}}, "text.format.name"),
        ({"text": {"format": {"type": "grammar"}}}, "text.format.type"),
        ({"input": []}, "input"),
        ({"input": ["Hi"]}, "input[0]"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0].type"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input[0].content"),
        (
            {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "input[0].call_id",
        ),
        ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"text": {"format": {"type": "text"}, "verbosity": "loud"}}, "text.verbosity"),
    ],
)
async def test_bad_requests_name_their_param(fields: dict[str, Any], param: str) -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post(
            "/v1/responses", json={"model": CHAT_MODEL, "input": "Hi", **fields}
        )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert fleet.worker.generate_requests == []


async def test_worker_constraint_errors_are_named_text_format() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        fleet.worker.script = failing_script(
            InvalidRequestError("unsupported keyword", param="constraint")
        )
        response = await client.post(
            "/v1/responses",
            json={
                "model": CHAT_MODEL,
                "input": "Hi",
                "text": {"format": {"type": "json_schema", "name": "x", "schema": CITY_SCHEMA}},
            },
        )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "text.format"
    assert response.json()["error"]["message"] == "unsupported keyword"


async def test_unknown_model_is_404() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post("/v1/responses", json={"model": "nope", "input": "Hi"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"


async def test_openapi_documents_the_route() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        schema = (await client.get("/openapi.json")).json()
    assert "/v1/responses" in schema["paths"]
    assert "ResponsesRequest" in schema["components"]["schemas"]
