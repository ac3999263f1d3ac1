"""Test doubles shared by the unit tests: a scripted Engine and helpers that run real gRPC services
(controller, worker, a bare health server) in-process on port 0."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from services.common.errors import ChatfleetError, InvalidRequestError
from services.common.grpc_server import GrpcServer, create_server
from services.worker.config import WorkerConfig
from services.worker.engine.interface import (
    ChatPrompt,
    Conversation,
    Engine,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    LoadInfo,
    ModelDescription,
)
from services.worker.engine.loading import ModelSpec


def chunk(text: str, *ids: int) -> GenerationChunk:
    return GenerationChunk(text=text, token_ids=list(ids))


def final_chunk(
    text: str = "", *ids: int, prompt_tokens: int = 3, completion_tokens: int = 2
) -> GenerationChunk:
    return GenerationChunk(
        text=text,
        token_ids=list(ids),
        finish_reason=FinishReason.STOP,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
    )


DEFAULT_SCRIPT = (chunk("Hello", 1), chunk(",", 2), final_chunk(" world", 3, completion_tokens=3))


class FakeEngine(Engine):
    """An Engine that streams scripted chunks and records what it was asked.

    `hold_after`: block the stream after that many chunks until `release` is set (to observe a
    request in flight). `endless`: stream the script's first chunk forever without awaiting
    anything. `error`: raised on the first step of generate (e.g. OverloadedError).
    `start_gate`: start() waits for it (to observe a worker that is still loading).
    """

    def __init__(
        self,
        name: str = "fake-chat",
        *,
        aliases: Sequence[str] = (),
        context_length: int = 2048,
        generates: bool = True,
        capacity: int = 4,
        script: Sequence[GenerationChunk] = DEFAULT_SCRIPT,
        hold_after: int | None = None,
        endless: bool = False,
        error: ChatfleetError | None = None,
        start_gate: asyncio.Event | None = None,
    ) -> None:
        self._description = ModelDescription(
            name=name,
            context_length=context_length,
            supports_generate=generates,
            supports_chat=generates,
            supports_embeddings=True,
            aliases=tuple(aliases),
            source=f"/models/{name}",
        )
        self.capacity = capacity
        self.script = list(script)
        self.hold_after = hold_after
        self.endless = endless
        self.error = error
        self.start_gate = start_gate
        self.starting = asyncio.Event()  # set when start() begins
        self.release = asyncio.Event()
        self.held = asyncio.Event()  # set when a stream reaches hold_after
        self.stream_closed = asyncio.Event()
        self.broken = asyncio.Event()  # set it to make failure() return (the engine died)
        self.requests: list[GenerationRequest] = []
        self.running = 0
        self.started = False
        self.stopped = False

    @property
    def description(self) -> ModelDescription:
        return self._description

    async def start(self) -> None:
        self.starting.set()
        if self.start_gate is not None:
            await self.start_gate.wait()
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def failure(self) -> str:
        await self.broken.wait()
        return "the fake engine broke"

    def load(self) -> LoadInfo:
        return LoadInfo(running=self.running, waiting=0, capacity=self.capacity)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        self.requests.append(request)
        if not self._description.supports_generate:
            raise InvalidRequestError(f"{self._description.name} cannot generate", param="model")
        if self.error is not None:
            raise self.error
        self.running += 1
        try:
            if self.endless:
                while True:
                    yield self.script[0]
            for index, piece in enumerate(self.script):
                if index == self.hold_after:
                    self.held.set()
                    await self.release.wait()
                yield piece
        finally:
            self.running -= 1
            self.stream_closed.set()

    async def tokenize(self, prompt: str | ChatPrompt) -> list[int]:
        if isinstance(prompt, Conversation):
            prompt = prompt.messages
        text = prompt if isinstance(prompt, str) else " ".join(m.content for m in prompt)
        return [index + 1 for index, _ in enumerate(text.split())]

    async def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        return [[1.0, 0.0] for _ in texts], sum(len(text.split()) for text in texts)


async def start_health_server() -> GrpcServer:
    """A server with only health and reflection, standing in for a worker; starts NOT_SERVING."""
    server = create_server("127.0.0.1", 0, [])
    await server.start()
    return server


def worker_config(
    controller_address: str = "", *, heartbeat_interval: float = 5.0, shutdown_grace: float = 5.0
) -> WorkerConfig:
    """A worker on a free port; standalone unless a controller address is given. The model specs
    only satisfy validation: tests hand FakeEngines to Worker.start."""
    return WorkerConfig(
        models=(ModelSpec(path="/models/fake", names=("fake-chat",)),),
        port=0,
        controller_address=controller_address,
        no_register=not controller_address,
        heartbeat_interval=heartbeat_interval,
        shutdown_grace=shutdown_grace,
    )
