"""The official OpenAI Python SDK against a live stack with the default models."""

from __future__ import annotations

import math

import openai
import pytest

from tests.integration.conftest import CHAT_MODEL, EMBEDDING_MODEL, Stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0)


def test_models_lists_both_default_models(client: openai.OpenAI) -> None:
    ids = {model.id for model in client.models.list()}
    assert {CHAT_MODEL, EMBEDDING_MODEL} <= ids


def test_chat_answers_paris(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=32,
    )
    assert reply.object == "chat.completion"
    assert reply.model == CHAT_MODEL
    choice = reply.choices[0]
    assert "Paris" in (choice.message.content or "")
    assert choice.message.role == "assistant"
    assert choice.finish_reason in {"stop", "length"}
    assert reply.usage is not None
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_chat_stream_matches_non_stream(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(
        model=CHAT_MODEL, messages=messages, temperature=0, max_tokens=24
    )
    stream = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=messages,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_stop_string_is_not_returned(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=CHAT_MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=32,
        stop=["Paris"],
    )
    assert "Paris" not in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason == "stop"


def test_completions_with_echo_and_logprobs(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    reply = client.completions.create(
        model=CHAT_MODEL, prompt=prompt, max_tokens=5, temperature=0, echo=True, logprobs=2
    )
    text = reply.choices[0].text
    assert text.startswith(prompt)
    assert len(text) > len(prompt)
    logprobs = reply.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs
    assert all(lp is None or lp <= 0 for lp in logprobs.token_logprobs)


def test_completions_stream(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=CHAT_MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert text


def test_embeddings_float_and_base64(client: openai.OpenAI) -> None:
    inputs = ["The cat sits on the mat.", "A cat is sitting on a mat.", "Stock markets fell."]
    as_float = client.embeddings.create(
        model=EMBEDDING_MODEL, input=inputs, encoding_format="float"
    )
    as_base64 = client.embeddings.create(model=EMBEDDING_MODEL, input=inputs)  # SDK asks base64
    vectors = [item.embedding for item in as_float.data]
    assert len(vectors) == 3 and len(vectors[0]) == 384
    for a, b in zip(vectors, (item.embedding for item in as_base64.data), strict=True):
        assert a == pytest.approx(b, abs=1e-6)

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert math.isclose(cosine(vectors[0], vectors[0]), 1.0, abs_tol=1e-4)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    assert as_float.usage.prompt_tokens > 0


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_bad_parameter_is_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], temperature=-1
        )
    assert caught.value.body["param"] == "temperature"  # type: ignore[index]


def test_prompt_beyond_context_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=CHAT_MODEL, prompt="hello", max_tokens=10_000_000)
    assert "max_tokens" in str(caught.value.body)
