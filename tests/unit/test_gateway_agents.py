"""The gateway's agent features against fake workers: tools, tool turns and tool choice, output
constraints, logit_bias, prompt logprobs, and tool calls and reasoning in answers and streams."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from gateway_fakes import (
    CHAT_MODEL,
    REPLY,
    agent_script,
    chat_body,
    failing_script,
    fake_fleet,
    gateway_client,
    prompt_words,
    sse_events,
)
from google.protobuf import json_format
from openai.types.chat import ChatCompletionUserMessageParam

from chatfleet.v1 import worker_pb2
from services.common.errors import InvalidRequestError

# Any: the openai SDK takes these as its own TypedDicts.
WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
        "strict": True,
    },
}
TIME: Any = {"type": "function", "function": {"name": "get_time"}}
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}}


async def sent_chat(**fields: Any) -> worker_pb2.GenerateRequest:
    """The GenerateRequest a chat request with `fields` becomes."""
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post("/v1/chat/completions", json=chat_body(**fields))
    assert response.status_code == 200, response.text
    [sent] = fleet.worker.generate_requests
    return sent


async def sent_completion(**fields: Any) -> worker_pb2.GenerateRequest:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post(
            "/v1/completions", json={"model": CHAT_MODEL, "prompt": "x", **fields}
        )
    assert response.status_code == 200, response.text
    [sent] = fleet.worker.generate_requests
    return sent


def assert_400(response: Any, param: str) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, None)
    message: str = error["message"]
    return message


# --- tools and tool turns -------------------------------------------------------------------------


async def test_tools_tool_choice_and_template_kwargs_reach_the_worker() -> None:
    sent = await sent_chat(
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
        chat_template_kwargs={"enable_thinking": False, "depth": {"n": 2}},
    )
    weather, time = sent.chat.tools
    assert (weather.name, weather.description, weather.strict) == (
        "get_weather",
        "The weather in a city.",
        True,
    )
    assert json.loads(weather.parameters_json) == WEATHER["function"]["parameters"]
    assert (time.name, time.parameters_json, time.strict) == ("get_time", "", False)
    assert sent.tool_choice.mode == worker_pb2.TOOL_CHOICE_MODE_NAMED
    assert sent.tool_choice.name == "get_time"
    assert sent.tool_choice.HasField("parallel_tool_calls")
    assert not sent.tool_choice.parallel_tool_calls
    assert json_format.MessageToDict(sent.chat.template_kwargs) == {
        "enable_thinking": False,
        "depth": {"n": 2},
    }
    assert not sent.HasField("constraint")


@pytest.mark.parametrize(
    ("choice", "mode"),
    [
        (None, worker_pb2.TOOL_CHOICE_MODE_AUTO),
        ("auto", worker_pb2.TOOL_CHOICE_MODE_AUTO),
        ("none", worker_pb2.TOOL_CHOICE_MODE_NONE),
        ("required", worker_pb2.TOOL_CHOICE_MODE_REQUIRED),
    ],
)
async def test_tool_choice_modes(choice: str | None, mode: int) -> None:
    fields: dict[str, Any] = {"tools": [WEATHER]}
    if choice is not None:
        fields["tool_choice"] = choice
    sent = await sent_chat(**fields)
    assert sent.tool_choice.mode == mode
    assert not sent.tool_choice.HasField("parallel_tool_calls")


async def test_without_tools_there_is_no_tool_choice() -> None:
    sent = await sent_chat(tools=[], tool_choice="none")
    assert not sent.HasField("tool_choice")
    assert list(sent.chat.tools) == []


async def test_a_tool_conversation_becomes_chat_messages() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    sent = await sent_chat(
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {
                "role": "tool",
                "tool_call_id": "call_1",
                "content": [{"type": "text", "text": "21C"}],
            },
            {"role": "assistant", "content": "It is 21C.", "name": "bot"},
        ],
    )
    user, assistant, tool, answer = sent.chat.messages
    assert (user.role, user.content) == ("user", "Weather in Paris?")
    assert (assistant.role, assistant.content) == ("assistant", "")
    assert [(c.id, c.name, c.arguments) for c in assistant.tool_calls] == [
        ("call_1", "get_weather", '{"city": "Paris"}')
    ]
    assert (tool.role, tool.tool_call_id, tool.content) == ("tool", "call_1", "21C")
    assert (answer.content, answer.name) == ("It is 21C.", "bot")


async def test_legacy_functions_map_to_tools() -> None:
    sent = await sent_chat(
        functions=[WEATHER["function"]],
        function_call={"name": "get_weather"},
        messages=[
            {"role": "user", "content": "Weather?"},
            {
                "role": "assistant",
                "content": None,
                "function_call": {"name": "get_weather", "arguments": "{}"},
            },
            {"role": "function", "name": "get_weather", "content": "sunny"},
        ],
    )
    assert [tool.name for tool in sent.chat.tools] == ["get_weather"]
    assert sent.tool_choice.mode == worker_pb2.TOOL_CHOICE_MODE_NAMED
    _, assistant, function = sent.chat.messages
    [call] = assistant.tool_calls
    assert (call.name, call.arguments) == ("get_weather", "{}")
    assert (function.role, function.name, function.tool_call_id) == ("tool", "get_weather", call.id)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": [WEATHER, {"type": "code_interpreter"}]}, "tools[1].type"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools[0].function.parameters",
        ),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        ({"tools": [TIME, TIME]}, "tools[1].function.name"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": "required", "tools": []}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"tools": [WEATHER], "parallel_tool_calls": "no"}, "parallel_tool_calls"),
        ({"functions": [{"name": "f"}], "tools": [WEATHER]}, "functions"),
        ({"function_call": {"name": "f"}}, "function_call"),
        ({"functions": [{"name": "f"}], "function_call": {"name": "g"}}, "function_call"),
        ({"chat_template_kwargs": ["x"]}, "chat_template_kwargs"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].name"),
        ({"messages": [{"role": "assistant", "content": None}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": [{"id": "c"}]}]},
            "messages[0].tool_calls[0].type",
        ),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": "x",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{}"},
                            }
                        ],
                    }
                ]
            },
            "messages[0].tool_calls",
        ),
    ],
)
async def test_bad_tool_requests_name_the_param(fields: dict[str, Any], param: str) -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post("/v1/chat/completions", json=chat_body(**fields))
    assert_400(response, param)
    assert fleet.worker.generate_requests == []


# --- output constraints ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": SCHEMA},
                }
            },
            {"json_schema": SCHEMA},
        ),
        ({"response_format": {"type": "json_object"}}, {"json_object": True}),
        ({"response_format": {"type": "text"}}, None),
        ({"structured_outputs": {"json": SCHEMA}}, {"json_schema": SCHEMA}),
        ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, {"json_schema": SCHEMA}),
        ({"structured_outputs": {"regex": "[0-9]+"}}, {"regex": "[0-9]+"}),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, {"choice": ["yes", "no"]}),
        ({"structured_outputs": {"grammar": 'start: "a"'}}, {"grammar": 'start: "a"'}),
        ({"structured_outputs": {"json_object": True, "regex": None}}, {"json_object": True}),
        ({"guided_json": SCHEMA}, {"json_schema": SCHEMA}),
        ({"guided_json": json.dumps(SCHEMA)}, {"json_schema": SCHEMA}),
        ({"guided_regex": "a|b", "guided_decoding_backend": "xgrammar"}, {"regex": "a|b"}),
        ({"guided_choice": ["a"], "guided_whitespace_pattern": " "}, {"choice": ["a"]}),
        ({"guided_grammar": "root ::= 'a'"}, {"grammar": "root ::= 'a'"}),
    ],
)
@pytest.mark.parametrize("route", ["chat", "completions"])
async def test_constraints_reach_the_worker(
    fields: dict[str, Any], expected: dict[str, Any] | None, route: str
) -> None:
    sent = await (sent_chat(**fields) if route == "chat" else sent_completion(**fields))
    if expected is None:
        assert not sent.HasField("constraint")
        return
    [(kind, value)] = expected.items()
    assert sent.constraint.WhichOneof("kind") == kind
    if kind == "json_schema":
        assert json.loads(sent.constraint.json_schema) == value
    elif kind == "choice":
        assert list(sent.constraint.choice.choices) == value
    else:
        assert getattr(sent.constraint, kind) == value


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a"}}},
            "response_format",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": 5}}},
            "response_format",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
            "response_format",
        ),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs"),
        ({"structured_outputs": {"json": "[1]"}}, "structured_outputs"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs"),
        ({"structured_outputs": {"choice": ["a", ""]}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": " "}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs"),
        ({"structured_outputs": "json"}, "structured_outputs"),
        ({"guided_json": "5"}, "guided_json"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
        ),
    ],
)
@pytest.mark.parametrize("route", ["chat", "completions"])
async def test_bad_constraints_name_the_field(
    fields: dict[str, Any], param: str, route: str
) -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        if route == "chat":
            response = await client.post("/v1/chat/completions", json=chat_body(**fields))
        else:
            body = {"model": CHAT_MODEL, "prompt": "x", **fields}
            response = await client.post("/v1/completions", json=body)
    assert_400(response, param)
    assert fleet.worker.generate_requests == []


@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
async def test_a_forced_tool_call_leaves_no_room_for_a_response_format(choice: Any) -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post(
            "/v1/chat/completions",
            json=chat_body(
                tools=[WEATHER], tool_choice=choice, response_format={"type": "json_object"}
            ),
        )
        auto = await client.post(
            "/v1/chat/completions",
            json=chat_body(tools=[WEATHER], response_format={"type": "json_object"}),
        )
    assert "forced tool call" in assert_400(response, "response_format")
    assert auto.status_code == 200, auto.text


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": SCHEMA},
                }
            },
            "response_format",
        ),
        ({"structured_outputs": {"regex": "("}}, "structured_outputs"),
        ({"guided_grammar": "root ::= x"}, "guided_grammar"),
        ({"tools": [WEATHER], "tool_choice": "required"}, "tools"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_a_constraint_the_worker_cannot_compile_is_reported_on_the_clients_field(
    fields: dict[str, Any], param: str, stream: bool
) -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        fleet.worker.script = failing_script(
            InvalidRequestError("unsupported keyword 'foo'", param="constraint")
        )
        response = await client.post(
            "/v1/chat/completions", json=chat_body(stream=stream, **fields)
        )
    assert "unsupported keyword" in assert_400(response, param)


async def test_other_worker_params_pass_through() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        fleet.worker.script = failing_script(
            InvalidRequestError("token 99999 is not in the vocabulary", param="logit_bias")
        )
        response = await client.post(
            "/v1/chat/completions",
            json=chat_body(logit_bias={"99999": 1}, guided_regex="a"),
        )
    assert_400(response, "logit_bias")


# --- logit_bias -----------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["chat", "completions"])
async def test_logit_bias_reaches_the_worker(route: str) -> None:
    fields = {"logit_bias": {"50256": -100, "7": 2.5, "0": 100}}
    sent = await (sent_chat(**fields) if route == "chat" else sent_completion(**fields))
    assert dict(sent.sampling.logit_bias) == {50256: -100.0, 7: 2.5, 0: 100.0}


@pytest.mark.parametrize(
    "bias",
    [
        {"-1": 1},
        {"a": 1},
        {"1.5": 1},
        {"": 1},
        {"1": 101},
        {"1": -100.5},
        {"1": "1"},
        {"1": True},
        {"1": None},
        {str(2**32): 1},
        {"\u0661": 1},
        [1],
    ],
)
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
async def test_bad_logit_bias_is_400(bias: Any, route: str) -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        body = (
            chat_body()
            if route.endswith("chat/completions")
            else {"model": CHAT_MODEL, "prompt": "x"}
        )
        response = await client.post(route, json={**body, "logit_bias": bias})
    assert_400(response, "logit_bias")
    assert fleet.worker.generate_requests == []


# --- prompt logprobs (lm-evaluation-harness' loglikelihood) ---------------------------------------


async def test_echo_with_logprobs_scores_the_prompt() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post(
            "/v1/completions",
            json={
                "model": CHAT_MODEL,
                "prompt": "The cat sat",
                "echo": True,
                "logprobs": 1,
                "max_tokens": 1,
                "temperature": 0,
            },
        )
        plain = await client.post(
            "/v1/completions", json={"model": CHAT_MODEL, "prompt": "x", "logprobs": 1}
        )
    assert response.status_code == 200, response.text
    first, second = fleet.worker.generate_requests
    assert first.echo and first.logprobs.enabled and first.logprobs.prompt
    assert first.logprobs.top_logprobs == 1
    assert plain.status_code == 200 and not second.logprobs.prompt
    [choice] = response.json()["choices"]
    assert choice["text"] == "The cat sat" + REPLY[0]
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["The", "cat", "sat", REPLY[0]]
    assert logprobs["token_logprobs"][0] is None
    assert logprobs["top_logprobs"][0] is None
    assert all(isinstance(value, float) for value in logprobs["token_logprobs"][1:])
    assert logprobs["top_logprobs"][1] == {"cat#0": -1.0}
    assert logprobs["text_offset"] == [0, 3, 6, 11]


async def score_only(
    request: worker_pb2.GenerateRequest,
) -> AsyncIterator[worker_pb2.GenerateResponse]:
    """A worker scoring a prompt with max_tokens 0: the echo, then an empty final message."""
    words = prompt_words(request)
    echo = worker_pb2.GenerateResponse(text=request.text, is_prompt_echo=True)
    for i, word in enumerate(words):
        echo.logprobs.add(token=word, logprob=math.nan if i == 0 else -1.5)
    yield echo
    final = worker_pb2.GenerateResponse(finish_reason=worker_pb2.FINISH_REASON_LENGTH)
    final.usage.prompt_tokens = len(words)
    yield final


@pytest.mark.parametrize("stream", [False, True])
async def test_max_tokens_zero_with_echo_only_scores(stream: bool) -> None:
    body = {
        "model": CHAT_MODEL,
        "prompt": "a b",
        "echo": True,
        "logprobs": 0,
        "max_tokens": 0,
        "stream": stream,
    }
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        fleet.worker.script = score_only
        response = await client.post("/v1/completions", json=body)
        refused = await client.post("/v1/completions", json={**body, "echo": False})
    assert response.status_code == 200, response.text
    [sent, *_] = fleet.worker.generate_requests
    assert sent.stopping.HasField("max_tokens") and sent.stopping.max_tokens == 0
    if stream:
        events = sse_events(response.text)
        logprobs = events[0]["choices"][0]["logprobs"]
        assert events[-1] == "[DONE]"
    else:
        [choice] = response.json()["choices"]
        assert choice["text"] == "a b"
        logprobs = choice["logprobs"]
    assert logprobs["tokens"] == ["a", "b"]
    assert logprobs["token_logprobs"] == [None, -1.5]
    assert_400(refused, "max_tokens")
    assert len(fleet.worker.generate_requests) == 1


# --- answers: tool calls and reasoning ------------------------------------------------------------

CALLS = (("get_weather", '{"city": "Paris"}'), ("get_time", "{}"))


async def test_tool_calls_and_reasoning_in_a_whole_answer() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        fleet.worker.script = agent_script(reasoning="Let me look.", calls=CALLS)
        response = await client.post(
            "/v1/chat/completions", json=chat_body(tools=[WEATHER, TIME], n=2)
        )
        fleet.worker.script = agent_script(text="Plain.")
        plain = await client.post("/v1/chat/completions", json=chat_body())
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert len(choices) == 2
    for choice in choices:
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"] == {
            "role": "assistant",
            "content": None,
            "reasoning_content": "Let me look. ",
            "tool_calls": [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": "{}"},
                },
            ],
        }
    assert plain.json()["choices"][0]["message"] == {"role": "assistant", "content": "Plain."}


async def test_streamed_tool_call_chunks() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        fleet.worker.script = agent_script(reasoning="Hmm ok", text="Sure.", calls=CALLS[:1])
        response = await client.post(
            "/v1/chat/completions", json=chat_body(tools=[WEATHER], stream=True)
        )
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    deltas = [event["choices"][0]["delta"] for event in events[:-1]]
    assert deltas == [
        {"role": "assistant"},
        {"reasoning_content": "Hmm "},
        {"reasoning_content": "ok "},
        {"content": "Sure."},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":'},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]},
        {},
    ]
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls"


async def test_the_openai_sdk_reassembles_streamed_tool_calls_per_choice() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as http:
        fleet.worker.script = agent_script(reasoning="Thinking it over", calls=CALLS)
        client = openai.AsyncOpenAI(
            base_url="http://gateway/v1", api_key="sk-test", http_client=http, max_retries=0
        )
        async with client.chat.completions.stream(
            model=CHAT_MODEL,
            messages=[{"role": "user", "content": "Weather and time in Paris?"}],
            tools=[WEATHER, TIME],
            n=2,
        ) as stream:
            argument_deltas = [
                event
                async for event in stream
                if event.type == "tool_calls.function.arguments.delta"
            ]
            completion = await stream.get_final_completion()
    assert argument_deltas
    assert len(completion.choices) == 2
    for choice in completion.choices:
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        calls = choice.message.tool_calls or []
        assert [(c.id, c.type, c.function.name, c.function.arguments) for c in calls] == [
            ("call_0", "function", "get_weather", '{"city": "Paris"}'),
            ("call_1", "function", "get_time", "{}"),
        ]
        extra = choice.message.model_extra or {}
        assert extra.get("reasoning_content") == "Thinking it over "


async def test_the_openai_sdk_parses_a_whole_tool_call_answer() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as http:
        fleet.worker.script = agent_script(calls=CALLS[:1])
        client = openai.AsyncOpenAI(
            base_url="http://gateway/v1", api_key="sk-test", http_client=http, max_retries=0
        )
        completion = await client.chat.completions.create(
            model=CHAT_MODEL,
            messages=[ChatCompletionUserMessageParam(role="user", content="Weather in Paris?")],
            tools=[WEATHER],
            tool_choice="required",
        )
    [call] = completion.choices[0].message.tool_calls or []
    assert call.type == "function"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert completion.choices[0].finish_reason == "tool_calls"
