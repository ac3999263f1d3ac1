"""The gateway's FastChat extras against fake gRPC servers: CORS for browser clients (preflight
included), /api/v1/chat/completions, /api/v1/token_check and /v1/engines/{model}/embeddings."""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import ssl
import subprocess
from pathlib import Path

import gateway_fakes
import grpc
import httpx
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
from services.gateway.main import serve

BROWSER = "http://localhost:3000"  # where ChatGPT-Next-Web's dev server runs
ANSWER = "".join(REPLY)
CONTEXT_LENGTH = 10


def preflight(origin: str = BROWSER) -> dict[str, str]:
    """The headers a browser sends before a JSON POST carrying an API key."""
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }


# --- CORS ----------------------------------------------------------------------------------------


async def test_preflight_from_a_browser_origin_passes_without_the_api_key() -> None:
    async with fake_fleet(api_keys=("sk-1",)) as fleet, gateway_client(fleet.config) as client:
        response = await client.options("/v1/chat/completions", headers=preflight())
    assert response.status_code == 200, response.text
    assert response.headers["access-control-allow-origin"] == "*"
    assert "POST" in response.headers["access-control-allow-methods"]
    allowed = response.headers["access-control-allow-headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed


async def test_cross_origin_answers_and_errors_are_readable_by_the_browser() -> None:
    async with fake_fleet(api_keys=("sk-1",)) as fleet, gateway_client(fleet.config) as client:
        ok = await client.post(
            "/v1/chat/completions",
            json=chat_body(),
            headers={"Origin": BROWSER, "Authorization": "Bearer sk-1"},
        )
        refused = await client.post(
            "/v1/chat/completions", json=chat_body(), headers={"Origin": BROWSER}
        )
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "*"
    assert "x-request-id" in ok.headers["access-control-expose-headers"].lower()
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == "*"
    assert refused.json()["error"]["code"] == "invalid_api_key"


async def test_only_the_allowed_origins_pass() -> None:
    allowed = "https://chat.example"
    async with (
        fake_fleet(allowed_origins=(allowed,), allow_credentials=True) as fleet,
        gateway_client(fleet.config) as client,
    ):
        welcome = await client.options("/v1/models", headers=preflight(allowed))
        stranger = await client.options("/v1/models", headers=preflight("https://evil.example"))
    assert welcome.status_code == 200
    assert welcome.headers["access-control-allow-origin"] == allowed
    assert welcome.headers["access-control-allow-credentials"] == "true"
    assert stranger.status_code == 400
    assert "access-control-allow-origin" not in stranger.headers


async def test_no_allowed_origins_turns_cors_off() -> None:
    async with fake_fleet(allowed_origins=()) as fleet, gateway_client(fleet.config) as client:
        response = await client.get("/v1/models", headers={"Origin": BROWSER})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


# --- /api/v1/chat/completions --------------------------------------------------------------------


async def test_api_v1_chat_takes_a_string_message_and_repetition_penalty() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post(
            "/api/v1/chat/completions",
            json={"model": CHAT_MODEL, "messages": "Hello there", "repetition_penalty": 1.25},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == CHAT_MODEL
    assert body["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    (sent,) = fleet.worker.generate_requests
    assert [(m.role, m.content) for m in sent.chat.messages] == [("user", "Hello there")]
    assert sent.sampling.repetition_penalty == 1.25


async def test_api_v1_chat_streams_like_v1() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post("/api/v1/chat/completions", json=chat_body(stream=True))
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    text = "".join(event["choices"][0]["delta"].get("content", "") for event in events[:-1])
    assert text == ANSWER


async def test_api_v1_chat_needs_the_api_key_and_validates_like_v1() -> None:
    async with fake_fleet(api_keys=("sk-1",)) as fleet, gateway_client(fleet.config) as client:
        anonymous = await client.post("/api/v1/chat/completions", json=chat_body())
        bad = await client.post(
            "/api/v1/chat/completions",
            json=chat_body(repetition_penalty=0),
            headers={"Authorization": "Bearer sk-1"},
        )
    assert anonymous.status_code == 401
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "repetition_penalty"


# --- /v1/engines/{model}/embeddings --------------------------------------------------------------


async def test_engine_embeddings_take_the_model_from_the_path() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        by_path = await client.post(f"/v1/engines/{EMBED_MODEL}/embeddings", json={"input": "hi"})
        by_body = await client.post(
            "/v1/engines/ignored/embeddings", json={"model": EMBED_MODEL, "input": ["a", "bb"]}
        )
        missing = await client.post("/v1/engines/nope/embeddings", json={"input": "hi"})
    assert by_path.status_code == 200, by_path.text
    assert by_path.json()["model"] == EMBED_MODEL
    assert by_path.json()["data"][0]["object"] == "embedding"
    assert by_body.json()["model"] == EMBED_MODEL
    assert len(by_body.json()["data"]) == 2
    assert [r.model for r in fleet.worker.embed_requests] == [EMBED_MODEL, EMBED_MODEL]
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


# --- /api/v1/token_check -------------------------------------------------------------------------


@pytest.fixture
def tokenizing_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake workers count words as tokens, with a context of CONTEXT_LENGTH."""

    async def tokenize(
        self: gateway_fakes.FakeWorker,
        request: worker_pb2.TokenizeRequest,
        context: grpc.aio.ServicerContext,
    ) -> worker_pb2.TokenizeResponse:
        ids = list(range(len(request.text.split())))
        return worker_pb2.TokenizeResponse(
            token_ids=ids, count=len(ids), context_length=CONTEXT_LENGTH
        )

    monkeypatch.setattr(gateway_fakes.FakeWorker, "Tokenize", tokenize, raising=False)


@pytest.mark.usefixtures("tokenizing_workers")
async def test_token_check_counts_and_says_what_fits() -> None:
    prompts = [
        {"model": CHAT_MODEL, "prompt": "one two three", "max_tokens": CONTEXT_LENGTH - 3},
        {"model": CHAT_MODEL, "prompt": "one two three", "max_tokens": CONTEXT_LENGTH - 2},
    ]
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post("/api/v1/token_check", json={"prompts": prompts})
    assert response.status_code == 200, response.text
    assert response.json() == {
        "prompts": [
            {"fits": True, "tokenCount": 3, "contextLength": CONTEXT_LENGTH},
            {"fits": False, "tokenCount": 3, "contextLength": CONTEXT_LENGTH},
        ]
    }


@pytest.mark.usefixtures("tokenizing_workers")
async def test_token_check_errors_have_the_openai_shape() -> None:
    async with fake_fleet(api_keys=("sk-1",)) as fleet:
        async with gateway_client(fleet.config) as anonymous:
            refused = await anonymous.post("/api/v1/token_check", json={"prompts": []})
        key = {"Authorization": "Bearer sk-1"}
        async with gateway_client(fleet.config, headers=key) as client:
            incomplete = await client.post(
                "/api/v1/token_check", json={"prompts": [{"model": CHAT_MODEL, "max_tokens": 1}]}
            )
            unknown = await client.post(
                "/api/v1/token_check",
                json={"prompts": [{"model": "nope", "prompt": "x", "max_tokens": 1}]},
            )
    assert refused.status_code == 401
    assert incomplete.status_code == 400
    assert incomplete.json()["error"]["param"] == "prompts[0].prompt"
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"


# --- --ssl ---------------------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[str, str]:
    """A self-signed key and certificate for 127.0.0.1, made with the openssl command."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert),
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return str(key), str(cert)


async def test_ssl_serves_https(
    certificate: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    key, cert = certificate
    tls = {"ssl": True, "ssl_keyfile": key, "ssl_certfile": cert}
    async with fake_fleet(port=0, **tls) as fleet:
        ready = asyncio.Event()
        with caplog.at_level(logging.INFO, logger="services.gateway.main"):
            task = asyncio.create_task(serve(fleet.config, ready=ready))
            try:
                await asyncio.wait_for(ready.wait(), timeout=10)
                match = re.search(r"listening on (https://127\.0\.0\.1:\d+)", caplog.text)
                assert match is not None, caplog.text
                async with httpx.AsyncClient(
                    base_url=match.group(1), verify=ssl.create_default_context(cafile=cert)
                ) as client:
                    health = await client.get("/health")
                async with httpx.AsyncClient(
                    base_url=match.group(1).replace("https", "http")
                ) as plain:
                    with pytest.raises(httpx.HTTPError):
                        await plain.get("/health")
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
    assert health.status_code == 200
