"""A FastChat user's requests against a live stack: the seeds' own curl commands (only the host and
port changed) with the default chat model served under FastChat-era names, LangChain's ChatOpenAI,
FastChat's extra routes and a browser's CORS preflight."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from langchain_openai import ChatOpenAI

from services.worker.default_models import default_chat_model_path, default_embedding_model_path
from tests.integration.conftest import CHAT_MODEL, EMBEDDING_MODEL, Stack, make_stack

pytestmark = pytest.mark.integration

# The names the seeds' requests use for their model.
ALIASES = ("gpt-3.5-turbo", "chatglm3-6b", "vicuna-7b-v1.3")
CURL_TIMEOUT_S = 240

# Verbatim from the seeds (shared/seeds): a t9k SimpleMLService example (000), a t9k tutorial
# (001) and a ChatGLM + FastChat guide (002). Each runs in bash with `address` set to the gateway,
# after the seed's own host and port are replaced by the gateway's.
SEED_CHAT_GPT35 = """curl http://127.0.0.1:8000/v1/chat/completions \\
  -H "Content-Type: application/json" \\
  -d '{
     "model": "gpt-3.5-turbo",
     "messages": [{"role": "user", "content": "你好"}],
     "temperature": 0.5
   }'"""
SEED_CHAT_CHATGLM = """curl ${address}/v1/chat/completions \\
  -H "Content-Type: application/json" \\
  -d '{
    "model": "chatglm3-6b",
    "messages": [{"role": "user", "content": "你好"}],
    "temperature": 0.5
  }'"""
SEED_COMPLETION_CHATGLM = """curl ${address}/v1/completions \\
  -H "Content-Type: application/json" \\
  -d '{
    "model": "chatglm3-6b",
    "prompt": "很久很久以前，",
    "max_tokens": 100,
    "temperature": 0.5
  }'"""  # noqa: RUF001 (the seed's own full-width comma)
SEED_LIST_MODELS = "curl http://hostserver:8000/v1/models"
SEED_CHAT_VICUNA = """curl http://localhost:8000/v1/chat/completions \\
  -H "Content-Type: application/json" \\
  -d '{    "model": "vicuna-7b-v1.3",    "messages": [{"role": "user", "content": "Hello! What is your name?"}]  }'"""  # noqa: E501
SEED_COMPLETION_VICUNA = """curl http://localhost:8000/v1/completions \\
  -H "Content-Type: application/json" \\
  -d '{    "model": "vicuna-7b-v1.3",    "prompt": "Once upon a time",    "max_tokens": 41,    "temperature": 0.5  }'"""  # noqa: E501
SEED_EMBEDDINGS_VICUNA = """curl http://localhost:8000/v1/embeddings \\
  -H "Content-Type: application/json" \\
  -d '{    "model": "vicuna-7b-v1.3",    "input": "Hello world!"  }'"""


@pytest.fixture(scope="module")
def fastchat_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The default models, the chat model also answering to ALIASES, and FastChat's --seed."""
    worker_args = [
        "--model-path", str(default_chat_model_path()),
        "--model-names", ",".join((CHAT_MODEL, *ALIASES)),
        "--model-path", str(default_embedding_model_path()),
        "--model-names", EMBEDDING_MODEL,
        "--seed", "0",
        "--limit-worker-concurrency", "8",
        # FastChat's CPU worker serves float32, and so does this stack: the seeds' chat requests
        # sample (temperature 0.5) with no max_tokens, so their length is the model's choice; in
        # float32 with seed 0 they end in ~60 tokens, while bf16's sampled answer to the same
        # seed runs past 1,500 (minutes at one stream here).
        "--quantization", "none",
    ]  # fmt: skip
    running = make_stack(tmp_path_factory.mktemp("fastchat-stack-logs"), worker_args)
    try:
        running.start()
        yield running
    except BaseException:
        running.dump_logs()
        raise
    finally:
        running.stop()


def run_seed(command: str, gateway_url: str) -> Any:
    """Run a seed's curl command with its host and port replaced by the gateway's; its JSON."""
    if shutil.which("curl") is None:
        pytest.skip("the curl command is needed to run the seeds' requests verbatim")
    for seed_base in ("http://127.0.0.1:8000", "http://localhost:8000", "http://hostserver:8000"):
        command = command.replace(seed_base, gateway_url)
    done = subprocess.run(
        ["bash", "-c", command],
        env={"address": gateway_url, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=CURL_TIMEOUT_S,
        check=True,
    )
    return json.loads(done.stdout)


def test_seed_list_models_shows_every_name(fastchat_stack: Stack) -> None:
    listed = run_seed(SEED_LIST_MODELS, fastchat_stack.gateway_url)
    assert listed["object"] == "list"
    names = {card["id"] for card in listed["data"]}
    assert names == {CHAT_MODEL, *ALIASES, EMBEDDING_MODEL}


@pytest.mark.parametrize(
    ("command", "model"),
    [
        (SEED_CHAT_GPT35, "gpt-3.5-turbo"),
        (SEED_CHAT_CHATGLM, "chatglm3-6b"),
        (SEED_CHAT_VICUNA, "vicuna-7b-v1.3"),
    ],
)
def test_seed_chat_requests(fastchat_stack: Stack, command: str, model: str) -> None:
    reply = run_seed(command, fastchat_stack.gateway_url)
    assert reply["object"] == "chat.completion", reply
    assert reply["model"] == model  # the name asked for, as FastChat answers
    (choice,) = reply["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].strip()
    assert choice["finish_reason"] in ("stop", "length")
    assert reply["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize(
    ("command", "model", "max_tokens"),
    [(SEED_COMPLETION_CHATGLM, "chatglm3-6b", 100), (SEED_COMPLETION_VICUNA, "vicuna-7b-v1.3", 41)],
)
def test_seed_completion_requests(
    fastchat_stack: Stack, command: str, model: str, max_tokens: int
) -> None:
    reply = run_seed(command, fastchat_stack.gateway_url)
    assert reply["object"] == "text_completion", reply
    assert reply["model"] == model
    assert reply["choices"][0]["text"]
    assert 0 < reply["usage"]["completion_tokens"] <= max_tokens


def test_seed_embeddings_request(fastchat_stack: Stack) -> None:
    reply = run_seed(SEED_EMBEDDINGS_VICUNA, fastchat_stack.gateway_url)
    assert reply["object"] == "list", reply
    assert reply["model"] == "vicuna-7b-v1.3"
    (item,) = reply["data"]
    assert len(item["embedding"]) > 100
    assert reply["usage"]["prompt_tokens"] > 0


def test_worker_seed_makes_sampled_answers_reproducible(fastchat_stack: Stack) -> None:
    # The worker runs with --seed 0: the same sampled request, without a seed, the same answer.
    body = {"model": "vicuna-7b-v1.3", "prompt": "Once upon a time", "max_tokens": 12}
    with httpx.Client(base_url=fastchat_stack.gateway_url, timeout=120) as client:
        replies = [client.post("/v1/completions", json={**body, "temperature": 1.0}) for _ in "ab"]
    texts = [reply.json()["choices"][0]["text"] for reply in replies]
    assert texts[0] and texts[0] == texts[1]


def test_langchain_chat_openai_chats_and_streams(fastchat_stack: Stack) -> None:
    llm = ChatOpenAI(
        model="gpt-3.5-turbo",
        base_url=f"{fastchat_stack.gateway_url}/v1",
        api_key="EMPTY",
        temperature=0,
        max_tokens=32,
        timeout=120,
        max_retries=0,
    )
    question = "What is the capital of France?"
    answer = llm.invoke(question)
    assert "Paris" in str(answer.content)
    pieces = [str(chunk.content) for chunk in llm.stream(question)]
    assert len([piece for piece in pieces if piece]) > 1  # it really streamed
    assert "".join(pieces) == answer.content  # greedy: the same answer either way


def test_fastchat_extra_routes(fastchat_stack: Stack) -> None:
    url = fastchat_stack.gateway_url
    with httpx.Client(base_url=url, timeout=120) as client:
        checked = client.post(
            "/api/v1/token_check",
            json={
                "prompts": [{"model": "gpt-3.5-turbo", "prompt": "Hello world", "max_tokens": 8}]
            },
        )
        chat = client.post(
            "/api/v1/chat/completions",
            json={
                "model": "gpt-3.5-turbo",
                "messages": "What is the capital of France?",
                "temperature": 0,
                "max_tokens": 16,
                "repetition_penalty": 1.1,
            },
        )
        embedded = client.post("/v1/engines/all-MiniLM-L6-v2/embeddings", json={"input": "hi"})
    assert checked.status_code == 200, checked.text
    (result,) = checked.json()["prompts"]
    assert result["fits"] is True
    assert 0 < result["tokenCount"] < 8
    assert result["contextLength"] >= 2048
    assert chat.status_code == 200, chat.text
    assert "Paris" in chat.json()["choices"][0]["message"]["content"]
    assert embedded.status_code == 200, embedded.text
    assert len(embedded.json()["data"][0]["embedding"]) == 384


def test_browser_preflight(fastchat_stack: Stack) -> None:
    response = httpx.options(
        f"{fastchat_stack.gateway_url}/v1/chat/completions",
        headers={
            "Origin": "http://localhost:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "*"
