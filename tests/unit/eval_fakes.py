"""A fake OpenAI-compatible server for the MT-bench eval's tests: answers chat as scripted, can
ask for an API key, fail with a given status, or serve an embedding model that cannot chat. It
runs on a free loopback port in a thread of its own, so the command under test (which runs its
own event loop) talks to it over real HTTP."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from services.common.http_server import HttpServer
from services.eval.data import JUDGE_PROMPTS_FILE, QUESTION_FILE, REFERENCE_DIR, find_data_dir

JudgeReply = Callable[[str, str], str]  # (system prompt, user prompt) -> judgment


def rating_judge(system: str, user: str) -> str:
    """A judge that rates 7, or picks A in pairwise prompts."""
    if "[[A]]" in system:
        return "Assistant A is better. [[A]]"
    return "A fine answer. Rating: [[7]]"


@dataclass
class FakeOpenAI:
    chat_models: list[str] = field(default_factory=lambda: ["model-a", "model-b"])
    embed_models: list[str] = field(default_factory=lambda: ["embed-x"])
    judge_reply: JudgeReply = rating_judge
    api_key: str | None = None
    # The web UI's /api/models (chat capabilities), as chatfleet's gateway has it.
    capabilities: bool = True
    # Statuses to answer the next chat requests with, one per request, before answering.
    failures: list[int] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    # Each reply waits this long, so requests overlap; the most seen at once is kept.
    delay_s: float = 0.0
    in_flight: int = 0
    max_in_flight: int = 0
    url: str = ""

    def answer_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if not _is_judge(r)]

    def judge_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if _is_judge(r)]

    def app(self) -> FastAPI:
        app = FastAPI()

        def refused(request: Request) -> JSONResponse | None:
            if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
                return _error(401, "Incorrect API key provided")
            return None

        @app.get("/v1/models")
        async def models(request: Request) -> Any:
            names = sorted(self.chat_models + self.embed_models)
            return refused(request) or {"data": [{"id": n, "object": "model"} for n in names]}

        @app.get("/api/models")
        async def capabilities(request: Request) -> Any:
            if not self.capabilities:
                return _error(404, "Not Found")
            data = [
                {"id": n, "supports_chat": n in self.chat_models, "supports_embeddings": False}
                for n in sorted(self.chat_models + self.embed_models)
            ]
            return refused(request) or {"object": "list", "data": data}

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Any:
            body = await request.json()
            self.requests.append(body)
            if (error := refused(request)) is not None:
                return error
            if self.failures:
                return _error(self.failures.pop(0), "scripted failure")
            model = body["model"]
            if model in self.embed_models:
                return _error(400, f"{model} is an embedding model; it cannot generate")
            if model not in self.chat_models:
                return _error(404, f"The model '{model}' does not exist.")
            messages = body["messages"]
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                await asyncio.sleep(self.delay_s)
            finally:
                self.in_flight -= 1
            if _is_judge(body):
                text = self.judge_reply(messages[0]["content"], messages[-1]["content"])
            else:
                turn = sum(1 for m in messages if m["role"] == "user")
                text = f"{model} turn {turn}: {messages[-1]['content'][:40]}"
            return {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
            }

        return app


def _is_judge(body: dict[str, Any]) -> bool:
    # The eval sends a system prompt only to the judge (FastChat's judge prompts all have one).
    messages = body.get("messages") or []
    return bool(messages) and messages[0]["role"] == "system"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "error"}}, status_code=status)


@contextmanager
def serve(fake: FakeOpenAI) -> Iterator[FakeOpenAI]:
    """Serve `fake` on a free port in a thread; its `url` is set while the context is open."""
    ready = threading.Event()
    stop: dict[str, Any] = {}
    failure: list[BaseException] = []

    async def run() -> None:
        server = HttpServer(
            fake.app(), host="127.0.0.1", port=0, shutdown_grace_seconds=1, lifespan="on"
        )
        stop["event"], stop["loop"] = asyncio.Event(), asyncio.get_running_loop()
        try:
            await server.start()
            fake.url = server.url
        except BaseException as error:
            failure.append(error)
            raise
        finally:
            ready.set()
        try:
            await stop["event"].wait()
        finally:
            await server.stop()

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    ready.wait(30)
    if failure:
        raise failure[0]
    try:
        yield fake
    finally:
        stop["loop"].call_soon_threadsafe(stop["event"].set)
        thread.join(30)


def small_bench(directory: Path, question_ids: tuple[int, ...]) -> Path:
    """A FastChat data folder in `directory` (a test's tmp dir) with only some of the installed
    package's questions: tests pick categories without running all 80."""
    source = find_data_dir()
    (directory / "mt_bench" / "reference_answer").mkdir(parents=True)
    lines = (source / QUESTION_FILE).read_text().splitlines()
    chosen = [line for line in lines if json.loads(line)["question_id"] in question_ids]
    (directory / QUESTION_FILE).write_text("\n".join(chosen) + "\n")
    shutil.copy(source / JUDGE_PROMPTS_FILE, directory / JUDGE_PROMPTS_FILE)
    shutil.copy(source / REFERENCE_DIR / "gpt-4.jsonl", directory / REFERENCE_DIR / "gpt-4.jsonl")
    return directory
