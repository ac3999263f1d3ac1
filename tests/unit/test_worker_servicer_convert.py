"""services.worker.convert: protobuf to the engine's dataclasses and back."""

from __future__ import annotations

import json
import math

import pytest
from google.protobuf import struct_pb2

from chatfleet.v1 import common_pb2, worker_pb2
from services.common.errors import InvalidRequestError
from services.worker import convert
from services.worker.engine.interface import (
    ChatMessage,
    ConstraintKind,
    Conversation,
    FinishReason,
    GenerationChunk,
    LoadInfo,
    ModelDescription,
    OutputConstraint,
    SamplingParams,
    StoppingParams,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    ToolDefinition,
    TopLogprob,
)
from services.worker.engine.tools import ToolChoice, ToolChoiceMode


def test_unset_fields_take_the_engine_defaults() -> None:
    request = convert.to_generation_request(
        worker_pb2.GenerateRequest(model="m", text="Hello", request_id="r")
    )
    assert request.request_id == "r"
    assert request.prompt == "Hello"
    assert request.sampling == SamplingParams()
    assert request.stopping == StoppingParams()
    assert request.logprobs is None
    assert request.echo is False


def test_unset_sampling_fields_take_the_model_defaults() -> None:
    model_defaults = SamplingParams(temperature=0.2, top_p=0.9, top_k=40)
    unset = convert.to_generation_request(
        worker_pb2.GenerateRequest(model="m", text="Hello"), model_defaults
    )
    assert unset.sampling == model_defaults
    # A value the client sets wins, even when it is the proto's zero value.
    greedy = convert.to_generation_request(
        worker_pb2.GenerateRequest(
            model="m", text="Hello", sampling=worker_pb2.SamplingParams(temperature=0, top_k=0)
        ),
        model_defaults,
    )
    assert greedy.sampling == SamplingParams(temperature=0.0, top_p=0.9, top_k=0)


def test_every_field_is_carried_over() -> None:
    request = convert.to_generation_request(
        worker_pb2.GenerateRequest(
            model="m",
            token_ids=worker_pb2.TokenIds(ids=[5, 6, 7]),
            sampling=worker_pb2.SamplingParams(
                temperature=0.5,
                top_p=0.5,
                top_k=40,
                min_p=0.25,
                repetition_penalty=1.5,
                presence_penalty=-1.0,
                frequency_penalty=2.0,
                seed=123,
            ),
            stopping=worker_pb2.StoppingCriteria(
                max_tokens=16,
                min_tokens=2,
                stop=["END"],
                stop_token_ids=[9],
                ignore_eos=True,
            ),
            logprobs=worker_pb2.LogprobsParams(enabled=True),
            echo=True,
        )
    )
    assert request.prompt == [5, 6, 7]
    assert request.sampling == SamplingParams(
        temperature=0.5,
        top_p=0.5,
        top_k=40,
        min_p=0.25,
        repetition_penalty=1.5,
        presence_penalty=-1.0,
        frequency_penalty=2.0,
        seed=123,
    )
    assert request.stopping == StoppingParams(
        max_tokens=16, min_tokens=2, stop=("END",), stop_token_ids=(9,), ignore_eos=True
    )
    assert request.logprobs == 0  # the chosen token's logprob, no alternatives
    assert request.echo is True


def test_chat_prompt_becomes_messages() -> None:
    request = convert.to_generation_request(
        worker_pb2.GenerateRequest(
            model="m",
            chat=worker_pb2.ChatMessages(
                messages=[
                    worker_pb2.ChatMessage(role="system", content="Be brief."),
                    worker_pb2.ChatMessage(role="user", content="Hi"),
                ]
            ),
        )
    )
    assert request.prompt == [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")]


@pytest.mark.parametrize(
    ("sampling", "param"),
    [
        (worker_pb2.SamplingParams(temperature=math.nan), "temperature"),
        (worker_pb2.SamplingParams(temperature=math.inf), "temperature"),
        (worker_pb2.SamplingParams(top_p=math.nan), "top_p"),
        (worker_pb2.SamplingParams(repetition_penalty=math.inf), "repetition_penalty"),
    ],
)
def test_non_finite_numbers_are_refused(sampling: worker_pb2.SamplingParams, param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        convert.to_generation_request(
            worker_pb2.GenerateRequest(model="m", text="x", sampling=sampling)
        )
    assert caught.value.param == param


def test_tokenize_prompt_is_text_or_chat() -> None:
    text = worker_pb2.TokenizeRequest(model="m", text="")
    assert convert.to_tokenize_prompt(text) == ""  # empty text is valid: zero tokens
    chat = worker_pb2.TokenizeRequest(
        model="m",
        chat=worker_pb2.ChatMessages(messages=[worker_pb2.ChatMessage(role="user", content="a")]),
    )
    assert convert.to_tokenize_prompt(chat) == [ChatMessage("user", "a")]


def test_chunk_becomes_a_response_with_usage_only_when_finished() -> None:
    middle = convert.to_generate_response(
        GenerationChunk(
            text="Hi",
            token_ids=[4],
            logprobs=[
                TokenLogprob(token_id=4, token="Hi", logprob=-0.5, top=(TopLogprob(7, "Yo", -1.5),))
            ],
        )
    )
    assert (middle.text, list(middle.token_ids)) == ("Hi", [4])
    assert middle.logprobs[0].logprob == -0.5
    assert middle.logprobs[0].top_logprobs[0].token == "Yo"
    assert middle.finish_reason == worker_pb2.FINISH_REASON_UNSPECIFIED
    assert not middle.HasField("usage")

    last = convert.to_generate_response(
        GenerationChunk(
            text="",
            token_ids=[],
            finish_reason=FinishReason.LENGTH,
            prompt_tokens=5,
            completion_tokens=8,
            stop_reason="",
        )
    )
    assert last.finish_reason == worker_pb2.FINISH_REASON_LENGTH
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 8)

    echo = convert.to_generate_response(
        GenerationChunk(text="prompt", token_ids=[1, 2], is_prompt_echo=True)
    )
    assert echo.is_prompt_echo


def test_model_description_becomes_model_info() -> None:
    chat = convert.to_model_info(
        ModelDescription(
            name="chat",
            context_length=8192,
            supports_generate=True,
            supports_chat=True,
            supports_embeddings=True,
            aliases=("c",),
            source="/m/chat.gguf",
        )
    )
    assert chat == common_pb2.ModelInfo(
        name="chat",
        kind=common_pb2.MODEL_KIND_GENERATE,
        context_length=8192,
        supports_chat=True,
        supports_embeddings=True,
        aliases=["c"],
        source="/m/chat.gguf",
    )
    embed = convert.to_model_info(
        ModelDescription(
            name="e",
            context_length=512,
            supports_generate=False,
            supports_chat=False,
            supports_embeddings=True,
        )
    )
    assert embed.kind == common_pb2.MODEL_KIND_EMBED


def test_load_info_becomes_load() -> None:
    assert convert.to_load(LoadInfo(running=2, waiting=1, capacity=16)) == common_pb2.Load(
        running=2, waiting=1, capacity=16
    )


def chat(*messages: worker_pb2.ChatMessage, **fields: object) -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(
        model="m",
        chat=worker_pb2.ChatMessages(messages=list(messages), **fields),  # type: ignore[arg-type]
    )


USER = worker_pb2.ChatMessage(role="user", content="Weather?")
TOOL = worker_pb2.ToolDefinition(
    name="get_weather", parameters_json='{"type": "object", "properties": {}}', strict=True
)


def test_tools_and_template_kwargs_make_a_conversation() -> None:
    kwargs = struct_pb2.Struct()
    kwargs.update({"enable_thinking": False, "depth": 2})
    assistant = worker_pb2.ChatMessage(
        role="assistant",
        tool_calls=[worker_pb2.ToolCall(id="call_1", name="get_weather", arguments='{"a": 1}')],
    )
    answer = worker_pb2.ChatMessage(
        role="tool", content="sunny", tool_call_id="call_1", name="get_weather"
    )
    request = convert.to_generation_request(
        chat(USER, assistant, answer, tools=[TOOL], template_kwargs=kwargs)
    )
    prompt = request.prompt
    assert isinstance(prompt, Conversation)
    assert prompt.tools == (
        ToolDefinition(
            name="get_weather", parameters={"type": "object", "properties": {}}, strict=True
        ),
    )
    assert prompt.template_kwargs == {"enable_thinking": False, "depth": 2}
    assert prompt.messages[1].tool_calls == (
        ToolCall(id="call_1", name="get_weather", arguments='{"a": 1}'),
    )
    assert prompt.messages[2] == ChatMessage(
        "tool", "sunny", tool_call_id="call_1", name="get_weather"
    )
    assert request.constraint is None  # AUTO: the model decides


def test_tool_choice_resolution() -> None:
    def choice(request: worker_pb2.GenerateRequest) -> ToolChoice:
        return convert.to_tool_choice(request)

    assert choice(chat(USER, tools=[TOOL])) == ToolChoice(ToolChoiceMode.AUTO)
    assert choice(chat(USER)) == ToolChoice(ToolChoiceMode.NONE)
    named = worker_pb2.ToolChoice(
        mode=worker_pb2.TOOL_CHOICE_MODE_NAMED, name="get_weather", parallel_tool_calls=False
    )
    request = chat(USER, tools=[TOOL])
    request.tool_choice.CopyFrom(named)
    assert choice(request) == ToolChoice(
        ToolChoiceMode.NAMED, name="get_weather", parallel_tool_calls=False
    )


def test_forced_tool_choice_replaces_the_constraint() -> None:
    request = chat(USER, tools=[TOOL])
    request.constraint.regex = "a+"
    request.tool_choice.mode = worker_pb2.TOOL_CHOICE_MODE_REQUIRED
    forced = convert.to_generation_request(request).constraint
    assert forced is not None and forced.kind is ConstraintKind.JSON_SCHEMA
    assert json.loads(forced.spec)["items"]["anyOf"][0]["properties"]["name"] == {
        "const": "get_weather"
    }
    request.tool_choice.mode = worker_pb2.TOOL_CHOICE_MODE_NONE
    free = convert.to_generation_request(request)
    assert free.constraint == OutputConstraint(ConstraintKind.REGEX, spec="a+")
    assert free.prompt == [ChatMessage("user", "Weather?")]  # tools left out


@pytest.mark.parametrize(
    ("constraint", "expected"),
    [
        (
            worker_pb2.OutputConstraint(json_object=True),
            OutputConstraint(ConstraintKind.JSON_OBJECT),
        ),
        (
            worker_pb2.OutputConstraint(json_schema='{"type": "integer"}'),
            OutputConstraint(ConstraintKind.JSON_SCHEMA, spec='{"type": "integer"}'),
        ),
        (
            worker_pb2.OutputConstraint(choice=worker_pb2.ChoiceList(choices=["yes", "no"])),
            OutputConstraint(ConstraintKind.CHOICE, choices=("yes", "no")),
        ),
        (
            worker_pb2.OutputConstraint(grammar='start: "x"'),
            OutputConstraint(ConstraintKind.GRAMMAR, spec='start: "x"'),
        ),
    ],
)
def test_output_constraints(
    constraint: worker_pb2.OutputConstraint, expected: OutputConstraint
) -> None:
    request = worker_pb2.GenerateRequest(model="m", text="x", constraint=constraint)
    assert convert.to_generation_request(request).constraint == expected


def test_logit_bias_prompt_logprobs_and_scoring_only() -> None:
    request = worker_pb2.GenerateRequest(
        model="m",
        text="x",
        echo=True,
        sampling=worker_pb2.SamplingParams(logit_bias={7: -100.0, 3: 2.5}),
        logprobs=worker_pb2.LogprobsParams(enabled=True, top_logprobs=1, prompt=True),
        stopping=worker_pb2.StoppingCriteria(max_tokens=0),
    )
    converted = convert.to_generation_request(request)
    assert converted.logit_bias == ((3, 2.5), (7, -100.0))
    assert converted.prompt_logprobs and converted.logprobs == 1
    assert converted.stopping.max_tokens == 0


def test_generate_response_carries_reasoning_and_tool_calls() -> None:
    response = convert.to_generate_response(
        GenerationChunk(
            text="",
            token_ids=[1],
            finish_reason=FinishReason.TOOL_CALLS,
            reasoning_text="hmm",
            tool_calls=[ToolCallDelta(index=0, id="call_x", name="f", arguments="{}")],
        )
    )
    assert response.reasoning_text == "hmm"
    assert response.finish_reason == worker_pb2.FINISH_REASON_TOOL_CALLS
    assert [(d.index, d.id, d.name, d.arguments) for d in response.tool_calls] == [
        (0, "call_x", "f", "{}")
    ]
    info = convert.to_model_info(
        ModelDescription(
            name="m",
            context_length=8,
            supports_generate=True,
            supports_chat=True,
            supports_embeddings=False,
            tool_call_parser="hermes",
            reasoning_parser="think",
        )
    )
    assert (info.tool_call_parser, info.reasoning_parser) == ("hermes", "think")


def _with_tool(**fields: object) -> worker_pb2.GenerateRequest:
    return chat(USER, tools=[worker_pb2.ToolDefinition(**fields)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_message", "param"),
    [
        (chat(worker_pb2.ChatMessage(role="tool", content="x")), "messages[0].tool_call_id"),
        (
            chat(
                worker_pb2.ChatMessage(
                    role="assistant", tool_calls=[worker_pb2.ToolCall(name="f", arguments="{")]
                )
            ),
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            chat(
                USER,
                worker_pb2.ChatMessage(role="user", tool_calls=[worker_pb2.ToolCall(name="f")]),
            ),
            "messages[1].tool_calls",
        ),
        (chat(worker_pb2.ChatMessage(role="robot")), "messages"),
        (_with_tool(name="bad name"), "tools[0].function.name"),
        (_with_tool(name="f", parameters_json="{"), "tools[0].function.parameters"),
        (
            _with_tool(name="f", parameters_json='{"type": "string"}'),
            "tools[0].function.parameters",
        ),
        (_with_tool(name="f", parameters_json="[]"), "tools[0].function.parameters"),
        (chat(USER, tools=[TOOL, TOOL]), "tools[1].function.name"),
        (
            worker_pb2.GenerateRequest(
                model="m",
                text="x",
                tool_choice=worker_pb2.ToolChoice(mode=worker_pb2.TOOL_CHOICE_MODE_REQUIRED),
            ),
            "tool_choice",
        ),
        (
            worker_pb2.GenerateRequest(
                model="m",
                text="x",
                constraint=worker_pb2.OutputConstraint(choice=worker_pb2.ChoiceList()),
            ),
            "constraint",
        ),
        (
            worker_pb2.GenerateRequest(
                model="m",
                text="x",
                constraint=worker_pb2.OutputConstraint(
                    choice=worker_pb2.ChoiceList(choices=["a", ""])
                ),
            ),
            "constraint",
        ),
        (
            worker_pb2.GenerateRequest(
                model="m", text="x", constraint=worker_pb2.OutputConstraint(json_schema="nope")
            ),
            "constraint",
        ),
        (
            worker_pb2.GenerateRequest(
                model="m", text="x", sampling=worker_pb2.SamplingParams(logit_bias={1: 101.0})
            ),
            "logit_bias",
        ),
        (
            worker_pb2.GenerateRequest(
                model="m", text="x", sampling=worker_pb2.SamplingParams(logit_bias={1: math.nan})
            ),
            "logit_bias",
        ),
        (
            worker_pb2.GenerateRequest(
                model="m", text="x", logprobs=worker_pb2.LogprobsParams(enabled=True, prompt=True)
            ),
            "echo",
        ),
        (
            worker_pb2.GenerateRequest(
                model="m", text="x", stopping=worker_pb2.StoppingCriteria(max_tokens=0)
            ),
            "max_tokens",
        ),
    ],
)
def test_agent_request_errors_name_the_param(
    request_message: worker_pb2.GenerateRequest, param: str
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        convert.to_generation_request(request_message)
    assert caught.value.param == param
