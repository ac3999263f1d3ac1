"""The agent-facing API (issue 14) against the live stack with the default model, driven by clients
nobody here wrote: the official openai SDK, lm-evaluation-harness and LangChain. Requests are few
and short (the session's one stack is shared with the rest of the integration suite)."""

from __future__ import annotations

import asyncio
import json
import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.integration.conftest import CHAT_MODEL, Stack

pytestmark = pytest.mark.integration

LM_EVAL_TASKS = Path(__file__).resolve().parent / "lm_eval_tasks"

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"timezone": {"type": "string", "enum": ["UTC", "CET", "PST"]}},
    "required": ["timezone"],
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": WEATHER_PARAMETERS,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The current time in a time zone.",
            "parameters": TIME_PARAMETERS,
        },
    },
]
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "get_time": TIME_PARAMETERS}
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]

# Bounded so that even a 135M model closes the object within a few dozen tokens.
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
PERSON_FORMAT: dict[str, Any] = {
    "type": "json_schema",
    "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
}
PERSON_QUESTION = [{"role": "user", "content": "Invent a person. Reply in JSON with name and age."}]


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The worker's own tokenizer of the default model (converted from the GGUF once, then cached),
    so token ids seen here are the ones the worker samples."""
    from services.worker.default_models import DEFAULT_CHAT_MODEL_NAME, default_model_specs
    from services.worker.engine.loading import _load_tokenizer, resolve_source

    path = next(s.path for s in default_model_specs() if DEFAULT_CHAT_MODEL_NAME in s.names)
    return _load_tokenizer(resolve_source(path))


def assert_valid_call(name: str, arguments: str) -> dict[str, Any]:
    assert name in SCHEMAS, f"unknown tool {name!r}"
    parsed = json.loads(arguments)
    jsonschema.validate(parsed, SCHEMAS[name])
    return parsed


# --- tools ----------------------------------------------------------------------------------------


def test_required_tool_call_has_valid_arguments(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=WEATHER_QUESTION,
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=64,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls, choice.message
    for call in calls:
        assert call.type == "function"
        assert call.id
        assert_valid_call(call.function.name, call.function.arguments)
    assert len({call.id for call in calls}) == len(calls)


def test_named_tool_call_streams_the_same_call(client: openai.OpenAI) -> None:
    """A named tool_choice forces that function; streamed deltas (through the SDK's stream helper,
    which checks their shape) reassemble into the call the non-streamed request returns."""
    request: dict[str, Any] = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "What time is it in Berlin?"}],
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        "temperature": 0,
        "max_tokens": 48,
    }
    whole = client.chat.completions.create(**request)
    whole_calls = whole.choices[0].message.tool_calls
    assert whole_calls is not None and len(whole_calls) == 1
    assert whole_calls[0].function.name == "get_time"
    whole_args = assert_valid_call("get_time", whole_calls[0].function.arguments)
    assert whole.choices[0].finish_reason in {"tool_calls", "stop"}

    pieces: dict[int, dict[str, str]] = {}
    with client.chat.completions.stream(**request) as stream:
        for event in stream:
            if event.type != "chunk":
                continue
            for choice in event.chunk.choices:
                for delta in choice.delta.tool_calls or ():
                    call = pieces.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                    call["id"] += delta.id or ""
                    if delta.function is not None:
                        call["name"] += delta.function.name or ""
                        call["arguments"] += delta.function.arguments or ""
        final = stream.get_final_completion()
    assert list(pieces) == [0]
    assert pieces[0]["id"] and pieces[0]["name"] == "get_time"
    assert assert_valid_call("get_time", pieces[0]["arguments"]) == whole_args
    final_calls = final.choices[0].message.tool_calls
    assert final_calls is not None and len(final_calls) == 1
    assert final_calls[0].function.arguments == pieces[0]["arguments"]
    assert final.choices[0].finish_reason == whole.choices[0].finish_reason


def test_tool_result_round_trip_gets_an_answer(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[
            *WEATHER_QUESTION,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": '{"city": "Paris", "unit": "celsius"}',
                        },
                    }
                ],
            },
            {
                "role": "tool",
                "tool_call_id": "call_1",
                "content": '{"temperature": 21, "sky": "sunny"}',
            },
        ],
        tools=TOOLS,
        tool_choice="none",
        temperature=0,
        max_tokens=32,
    )
    choice = reply.choices[0]
    assert choice.finish_reason in {"stop", "length"}
    assert not choice.message.tool_calls
    assert (choice.message.content or "").strip()


# --- structured output ----------------------------------------------------------------------------


def test_json_object_output_parses(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=CHAT_MODEL,
        # A prompt the model ends in every --quantization mode (checked greedy on none, bf16,
        # int8 and int4): JSON mode may close the object at any point, the model decides when.
        messages=[
            {
                "role": "user",
                "content": "Describe Paris as a JSON object with the keys city and country.",
            },
        ],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=64,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    answer = json.loads(choice.message.content or "")
    assert isinstance(answer, dict)
    assert answer.get("city") == "Paris", answer


def test_json_schema_output_validates(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=PERSON_QUESTION,
        response_format=PERSON_FORMAT,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=48,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content or ""), PERSON_SCHEMA)


def test_concurrent_sampled_json_schema_streams_all_validate(stack: Stack) -> None:
    """Eight streams at temperature 1 batched together: every one follows the schema, so each
    request's grammar state stays its own."""

    async def one(client: openai.AsyncOpenAI, seed: int) -> tuple[str, str | None]:
        stream = await client.chat.completions.create(
            model=CHAT_MODEL,
            messages=PERSON_QUESTION,
            response_format=PERSON_FORMAT,  # type: ignore[arg-type]
            temperature=1.0,
            seed=seed,
            max_tokens=48,
            stream=True,
        )
        text, finish = [], None
        async for chunk in stream:
            for choice in chunk.choices:
                text.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        return "".join(text), finish

    async def all_of_them() -> list[tuple[str, str | None]]:
        async with openai.AsyncOpenAI(
            base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0
        ) as client:
            return await asyncio.gather(*(one(client, seed) for seed in range(8)))

    for text, finish in asyncio.run(all_of_them()):
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), PERSON_SCHEMA)


def test_vllm_structured_outputs_choice_and_guided_regex(client: openai.OpenAI) -> None:
    choice = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Is Paris in France?"}],
        temperature=0,
        max_tokens=8,
        extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe"]}},
    )
    assert choice.choices[0].message.content in {"yes", "no", "maybe"}

    regex = r"[0-9]{3}-[0-9]{4}"
    phone = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "Invent a phone number."}],
        temperature=0,
        max_tokens=16,
        extra_body={"guided_regex": regex},
    )
    assert re.fullmatch(regex, phone.choices[0].message.content or ""), phone.choices[0].message


def test_unsupported_schema_keyword_is_a_400(client: openai.OpenAI) -> None:
    """A schema the grammar library cannot compile is the client's error, named in the message."""
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=CHAT_MODEL,
            messages=PERSON_QUESTION,
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": "odd",
                    "schema": {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}},
                },
            },
            max_tokens=8,
        )
    assert "dependentSchemas" in str(caught.value)


# --- logit_bias and prompt logprobs ---------------------------------------------------------------


def test_logit_bias_bans_the_greedy_first_token(client: openai.OpenAI, tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    greedy = client.chat.completions.create(
        model=CHAT_MODEL, messages=messages, temperature=0, max_tokens=6, logprobs=True
    )
    logprobs = greedy.choices[0].logprobs
    assert logprobs is not None and logprobs.content
    first = logprobs.content[0].token
    ids = tokenizer.encode(first, add_special_tokens=False)
    assert len(ids) == 1 and tokenizer.decode(ids) == first, (first, ids)

    banned = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=messages,
        temperature=0,
        max_tokens=6,
        logprobs=True,
        logit_bias={str(ids[0]): -100},
    )
    assert banned.choices[0].message.content != greedy.choices[0].message.content
    banned_logprobs = banned.choices[0].logprobs
    assert banned_logprobs is not None and banned_logprobs.content
    assert banned_logprobs.content[0].token != first
    generated = tokenizer.encode(banned.choices[0].message.content or "", add_special_tokens=False)
    assert ids[0] not in generated[:1]


def test_echo_with_zero_max_tokens_scores_the_prompt(client: openai.OpenAI) -> None:
    prompt = "The capital of France is Paris."
    reply = client.completions.create(
        model=CHAT_MODEL, prompt=prompt, echo=True, max_tokens=0, logprobs=1, temperature=0
    )
    choice = reply.choices[0]
    assert choice.text == prompt
    assert choice.logprobs is not None
    tokens = choice.logprobs.tokens or []
    token_logprobs = choice.logprobs.token_logprobs or []
    assert "".join(tokens) == prompt
    assert len(token_logprobs) == len(tokens) > 1
    assert token_logprobs[0] is None
    rest = token_logprobs[1:]
    assert all(isinstance(v, float) and math.isfinite(v) and v <= 0 for v in rest), rest
    assert reply.usage is not None and reply.usage.completion_tokens == 0


# --- Responses API --------------------------------------------------------------------------------


def test_responses_create_and_stream(client: openai.OpenAI) -> None:
    question = "What is the capital of France?"
    plain = client.responses.create(
        model=CHAT_MODEL, input=question, temperature=0, max_output_tokens=16
    )
    assert plain.status in {"completed", "incomplete"}
    assert plain.output_text.strip()

    deltas, types = [], []
    with client.responses.stream(
        model=CHAT_MODEL, input=question, temperature=0, max_output_tokens=16
    ) as stream:
        for event in stream:
            types.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response()
    assert types[0] == "response.created"
    assert types[-1] in {"response.completed", "response.incomplete"}
    assert deltas
    assert final.output_text == "".join(deltas)
    assert final.output_text == plain.output_text


def test_responses_function_tool_required(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=CHAT_MODEL,
        input="What is the weather like in Paris today?",
        tools=[
            {
                "type": "function",
                "name": "get_weather",
                "description": "The current weather in a city.",
                "parameters": WEATHER_PARAMETERS,
                "strict": True,
            }
        ],
        tool_choice="required",
        temperature=0,
        max_output_tokens=64,
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls, response.output
    for call in calls:
        assert call.name == "get_weather" and call.call_id
        assert_valid_call(call.name, call.arguments)


# --- lm-evaluation-harness ------------------------------------------------------------------------


def test_lm_eval_loglikelihood_and_generate_until(
    stack: Stack, tokenizer: Any, tmp_path: Path
) -> None:
    """lm-eval's local-completions model: multiple choice scored by echo + prompt logprobs, and
    generate_until with stop strings, over two local tasks. It counts context tokens with the
    model's tokenizer (a local copy: there is no Hub here) and sends text."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": CHAT_MODEL,
            "base_url": f"{stack.gateway_url}/v1/completions",
            "tokenizer_backend": "huggingface",
            "tokenizer": str(tokenizer_dir),
            "tokenized_requests": False,
            "num_concurrent": 4,
            "max_retries": 1,
        },
        tasks=["chatfleet_capitals_mc", "chatfleet_arithmetic_gen"],
        task_manager=TaskManager(include_path=str(LM_EVAL_TASKS)),
        limit=4,
        log_samples=False,
    )
    assert results is not None
    scores = results["results"]
    accuracy = scores["chatfleet_capitals_mc"]["acc,none"]
    exact = scores["chatfleet_arithmetic_gen"]["exact_match,none"]
    assert isinstance(accuracy, float) and 0.0 <= accuracy <= 1.0
    assert isinstance(exact, float) and 0.0 <= exact <= 1.0


# --- LangChain ------------------------------------------------------------------------------------


class Capital(BaseModel):
    """The capital city of a country."""

    city: str = Field(max_length=20)
    country: str = Field(max_length=20)


def test_langchain_bind_tools_and_structured_output(stack: Stack) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        model=CHAT_MODEL,
        base_url=f"{stack.gateway_url}/v1",
        api_key="unused",  # type: ignore[arg-type]
        temperature=0,
        max_tokens=64,  # type: ignore[call-arg]
        max_retries=0,
    )
    tool = TOOLS[0]
    message = chat.bind_tools([tool], tool_choice="get_weather").invoke(
        "What is the weather like in Paris today?"
    )
    assert message.tool_calls, message  # type: ignore[attr-defined]
    for call in message.tool_calls:  # type: ignore[attr-defined]
        assert call["name"] == "get_weather"
        jsonschema.validate(call["args"], WEATHER_PARAMETERS)

    capital = chat.with_structured_output(Capital, method="json_schema").invoke(
        "What is the capital of France?"
    )
    assert isinstance(capital, Capital)
