"""services.worker.convert: protobuf to the engine's dataclasses and back."""

from __future__ import annotations

import math

import pytest

from chatfleet.v1 import common_pb2, worker_pb2
from services.common.errors import InvalidRequestError
from services.worker import convert
from services.worker.engine import (
    ChatMessage,
    FinishReason,
    GenerationChunk,
    LoadInfo,
    ModelDescription,
    SamplingParams,
    StoppingParams,
    TokenLogprob,
    TopLogprob,
)


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
