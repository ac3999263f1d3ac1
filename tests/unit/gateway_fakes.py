"""Test helpers for the gateway: fake ControllerService and WorkerService gRPC servers on port 0
answering with scripted responses or errors, and ways to run the gateway against them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import grpc
import httpx

from chatfleet.v1 import (
    common_pb2,
    controller_pb2,
    controller_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)
from services.common.errors import ChatfleetError, ModelNotFoundError
from services.common.grpc_server import GrpcServer, create_server
from services.common.http_server import HttpServer
from services.gateway.app import create_app
from services.gateway.config import GatewayConfig

CHAT_MODEL = "tiny-chat"
EMBED_MODEL = "tiny-embed"
# The reply of the default script, one piece (and one "token") per message.
REPLY = ("Hello", " from", " fake")

Script = Callable[[worker_pb2.GenerateRequest], AsyncIterator[worker_pb2.GenerateResponse]]


def _service_name(descriptor: Any, name: str) -> str:
    return str(descriptor.services_by_name[name].full_name)


def _logprob(piece: str, k: int) -> worker_pb2.TokenLogprob:
    return worker_pb2.TokenLogprob(
        token_id=len(piece),
        token=piece,
        logprob=-0.5,
        top_logprobs=[
            worker_pb2.TopLogprob(token_id=i, token=f"{piece}#{i}", logprob=-1.0 - i)
            for i in range(k)
        ],
    )


def prompt_words(request: worker_pb2.GenerateRequest) -> list[str]:
    """The prompt split into "tokens": words of the text or chat, or the ids."""
    kind = request.WhichOneof("prompt")
    if kind == "text":
        return request.text.split()
    if kind == "chat":
        return [word for message in request.chat.messages for word in message.content.split()]
    return [str(token) for token in request.token_ids.ids]


async def reply_script(
    request: worker_pb2.GenerateRequest,
) -> AsyncIterator[worker_pb2.GenerateResponse]:
    """Answer REPLY piece by piece, honouring echo, logprobs and max_tokens."""
    words = prompt_words(request)
    k = request.logprobs.top_logprobs
    with_logprobs = request.logprobs.enabled
    if request.echo:
        prompt_text = request.text if request.WhichOneof("prompt") == "text" else " ".join(words)
        echo = worker_pb2.GenerateResponse(
            text=prompt_text, token_ids=range(len(words)), is_prompt_echo=True
        )
        if with_logprobs:
            for i, word in enumerate(words):
                entry = _logprob(word, k)
                if i == 0:
                    entry.logprob = float("nan")
                    del entry.top_logprobs[:]
                echo.logprobs.append(entry)
        yield echo
    limit = request.stopping.max_tokens if request.stopping.HasField("max_tokens") else None
    pieces = REPLY[:limit] if limit is not None else REPLY
    for i, piece in enumerate(pieces):
        response = worker_pb2.GenerateResponse(text=piece, token_ids=[len(piece)])
        if with_logprobs:
            response.logprobs.append(_logprob(piece, k))
        if i == len(pieces) - 1:
            truncated = len(pieces) < len(REPLY)
            response.finish_reason = (
                worker_pb2.FINISH_REASON_LENGTH if truncated else worker_pb2.FINISH_REASON_STOP
            )
            response.usage.prompt_tokens = len(words)
            response.usage.completion_tokens = len(pieces)
        yield response


def failing_script(error: ChatfleetError, *, after: int = 0) -> Script:
    """Send `after` pieces of the reply, then fail with `error`."""

    async def script(
        request: worker_pb2.GenerateRequest,
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        for piece in REPLY[:after]:
            yield worker_pb2.GenerateResponse(text=piece, token_ids=[len(piece)])
        raise error

    return script


def hanging_script(*, after: int = 0) -> Script:
    """Send `after` pieces of the reply, then wait until the call is cancelled."""

    async def script(
        request: worker_pb2.GenerateRequest,
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        for piece in REPLY[:after]:
            yield worker_pb2.GenerateResponse(text=piece, token_ids=[len(piece)])
        await asyncio.Event().wait()

    return script


class FakeWorker(worker_pb2_grpc.WorkerServiceServicer):
    """A WorkerService whose Generate runs `script`; records what it was asked."""

    def __init__(self) -> None:
        self.address = ""
        self.script: Script = reply_script
        self.embed_error: ChatfleetError | None = None
        self.generate_requests: list[worker_pb2.GenerateRequest] = []
        self.embed_requests: list[worker_pb2.EmbedRequest] = []
        self.metadata: list[dict[str, Any]] = []
        self.generate_started = asyncio.Event()
        self.generate_cancelled = asyncio.Event()

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        self.generate_requests.append(request)
        self.metadata.append(dict(context.invocation_metadata() or ()))
        self.generate_started.set()
        try:
            async for response in self.script(request):
                yield response
        except asyncio.CancelledError:
            self.generate_cancelled.set()
            raise

    async def Embed(
        self, request: worker_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.EmbedResponse:
        self.embed_requests.append(request)
        if self.embed_error is not None:
            raise self.embed_error
        return worker_pb2.EmbedResponse(
            embeddings=[embedding_of(text) for text in request.inputs],
            prompt_tokens=sum(len(text.split()) for text in request.inputs),
        )


def embedding_of(text: str) -> worker_pb2.Embedding:
    """A vector exactly representable in float32, so base64 round trips compare equal."""
    return worker_pb2.Embedding(values=[0.5, -0.25, float(len(text))])


class FakeController(controller_pb2_grpc.ControllerServiceServicer):
    """A ControllerService routing each model to workers in a fixed order of preference."""

    def __init__(self) -> None:
        self.routes: dict[str, list[str]] = {}
        self.select_error: ChatfleetError | None = None
        self.list_error: ChatfleetError | None = None
        self.select_requests: list[controller_pb2.SelectWorkerRequest] = []

    async def ListModels(
        self, request: controller_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> controller_pb2.ListModelsResponse:
        if self.list_error is not None:
            raise self.list_error
        return controller_pb2.ListModelsResponse(
            models=[common_pb2.ModelInfo(name=name) for name in sorted(self.routes)]
        )

    async def SelectWorker(
        self, request: controller_pb2.SelectWorkerRequest, context: grpc.aio.ServicerContext
    ) -> controller_pb2.SelectWorkerResponse:
        self.select_requests.append(request)
        if self.select_error is not None:
            raise self.select_error
        addresses = self.routes.get(request.model)
        if not addresses:
            raise ModelNotFoundError(f"The model '{request.model}' does not exist.", param="model")
        preferred = [a for a in addresses if a not in request.exclude_addresses] or addresses
        return controller_pb2.SelectWorkerResponse(
            address=preferred[0], model=common_pb2.ModelInfo(name=request.model)
        )


@dataclass
class Fleet:
    """A fake controller and workers, and a gateway config pointing at them."""

    controller: FakeController
    controller_server: GrpcServer
    workers: list[FakeWorker]
    config: GatewayConfig

    @property
    def worker(self) -> FakeWorker:
        return self.workers[0]


@asynccontextmanager
async def fake_fleet(workers: int = 1, **config: Any) -> AsyncIterator[Fleet]:
    """Start a fake controller and `workers` fake workers serving CHAT_MODEL and EMBED_MODEL (in
    the workers' order of preference); `config` overrides GatewayConfig fields."""
    async with AsyncExitStack() as stack:
        controller = FakeController()
        controller_server = create_server(
            "127.0.0.1",
            0,
            [_service_name(controller_pb2.DESCRIPTOR, "ControllerService")],
        )
        controller_pb2_grpc.add_ControllerServiceServicer_to_server(
            controller, controller_server.server
        )
        servers = [controller_server]
        fakes = []
        for _ in range(workers):
            fake = FakeWorker()
            server = create_server(
                "127.0.0.1", 0, [_service_name(worker_pb2.DESCRIPTOR, "WorkerService")]
            )
            worker_pb2_grpc.add_WorkerServiceServicer_to_server(fake, server.server)
            fake.address = f"127.0.0.1:{server.port}"
            fakes.append(fake)
            servers.append(server)
        for server in servers:
            await server.start()
            stack.push_async_callback(server.server.stop, None)
            await server.set_serving(True)
        addresses = [fake.address for fake in fakes]
        controller.routes = {CHAT_MODEL: list(addresses), EMBED_MODEL: list(addresses)}
        gateway_config = GatewayConfig(
            controller_address=f"127.0.0.1:{controller_server.port}", **config
        )
        yield Fleet(controller, controller_server, fakes, gateway_config)


@asynccontextmanager
async def gateway_client(
    config: GatewayConfig, headers: dict[str, str] | None = None
) -> AsyncIterator[httpx.AsyncClient]:
    """The gateway app in-process (lifespan included), driven through httpx's ASGI transport."""
    app = create_app(config)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app), base_url="http://gateway", headers=headers
        ) as client,
    ):
        yield client


@asynccontextmanager
async def gateway_server(config: GatewayConfig) -> AsyncIterator[str]:
    """The gateway on a real uvicorn bound to a free port; yields its base URL."""
    config = replace(config, host="127.0.0.1", port=0, shutdown_grace_seconds=5)
    server = HttpServer(
        create_app(config), host=config.host, port=0, shutdown_grace_seconds=5, lifespan="on"
    )
    await server.start()
    try:
        yield server.url
    finally:
        await server.stop()


def sse_events(body: str) -> list[Any]:
    """The `data:` payloads of an SSE body: parsed JSON, or the string "[DONE]"."""
    events: list[Any] = []
    for line in body.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def chat_body(**fields: Any) -> dict[str, Any]:
    """A minimal valid chat request, with `fields` added or overridden."""
    return {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        **fields,
    }


def agent_script(
    *,
    reasoning: str = "",
    text: str = "",
    calls: tuple[tuple[str, str], ...] = (),
) -> Script:
    """Answer as a model that thinks and calls tools: `reasoning` (one piece per word), `text`,
    then each (name, arguments) call as ToolCallDeltas (its first piece names it, then the
    arguments in two halves); the finish reason is TOOL_CALLS when there are calls."""

    async def script(
        request: worker_pb2.GenerateRequest,
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        produced = 0
        for word in reasoning.split(" ") if reasoning else ():
            produced += 1
            yield worker_pb2.GenerateResponse(reasoning_text=word + " ")
        if text:
            produced += 1
            yield worker_pb2.GenerateResponse(text=text)
        for index, (name, arguments) in enumerate(calls):
            half = len(arguments) // 2
            produced += 2
            yield worker_pb2.GenerateResponse(
                tool_calls=[
                    worker_pb2.ToolCallDelta(
                        index=index, id=f"call_{index}", name=name, arguments=arguments[:half]
                    )
                ]
            )
            yield worker_pb2.GenerateResponse(
                tool_calls=[worker_pb2.ToolCallDelta(index=index, arguments=arguments[half:])]
            )
        final = worker_pb2.GenerateResponse(
            finish_reason=worker_pb2.FINISH_REASON_TOOL_CALLS
            if calls
            else worker_pb2.FINISH_REASON_STOP
        )
        final.usage.prompt_tokens = len(prompt_words(request))
        final.usage.completion_tokens = produced
        yield final

    return script
