"""WorkerService: generate, embed and tokenize with the worker's engines, found by model name.

Thin: converts protobuf with services.worker.convert, calls the engine, converts back. Refuses work
with UNAVAILABLE until every engine has started and once draining has begun.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace

import grpc

from chatfleet.v1 import worker_pb2, worker_pb2_grpc
from services.common.errors import InvalidRequestError, ModelNotFoundError, UnavailableError
from services.worker import convert
from services.worker.engine.interface import Engine, LoadInfo, ModelDescription
from services.worker.engine.output_parsing import create_output_parser

logger = logging.getLogger(__name__)


class ModelRegistry:
    """A worker's engines and the names (canonical and aliases) they answer to."""

    def __init__(
        self,
        engines: Sequence[Engine],
        *,
        tool_call_parser: str = "auto",
        reasoning_parser: str = "auto",
    ) -> None:
        """`tool_call_parser` and `reasoning_parser` (the worker's flags) override what each
        generative model detected from its chat template, unless "auto"."""
        self.engines = tuple(engines)
        self._tool_call_parser = tool_call_parser
        self._reasoning_parser = reasoning_parser
        self._by_name: dict[str, Engine] = {}
        self.started = False

    async def start(self) -> None:
        """Load every engine, one at a time (they compete for memory and cores), then index their
        names; ValueError when two models claim the same name."""
        for engine in self.engines:
            await engine.start()
        by_name: dict[str, Engine] = {}
        for engine in self.engines:
            description = self.description(engine)
            for name in (description.name, *description.aliases):
                if name in by_name:
                    raise ValueError(f"two models are served as {name!r}")
                by_name[name] = engine
        self._by_name = by_name
        self.started = True
        logger.info("models ready: %s", ", ".join(sorted(by_name)))

    async def drain(self) -> None:
        """Let every engine refuse new work and finish what it admitted."""
        await asyncio.gather(*(engine.drain() for engine in self.engines))

    async def stop(self) -> None:
        self.started = False
        for engine in self.engines:
            await engine.stop()

    def get(self, name: str) -> Engine:
        """The engine serving `name`; ModelNotFoundError when none does."""
        if not name:
            raise InvalidRequestError("'model' is required", param="model")
        engine = self._by_name.get(name)
        if engine is None:
            raise ModelNotFoundError(f"the model '{name}' does not exist", param="model")
        return engine

    def description(self, engine: Engine) -> ModelDescription:
        """The engine's description with the worker's choice of output parsers: the flags when
        set, else the engine's detection, else hermes (the worker then prompts Hermes-style)."""
        description = engine.description
        if not description.supports_generate:
            return replace(description, tool_call_parser="", reasoning_parser="")
        tool_call_parser = description.tool_call_parser or "hermes"
        if self._tool_call_parser != "auto":
            tool_call_parser = self._tool_call_parser
        reasoning_parser = description.reasoning_parser
        if self._reasoning_parser != "auto":
            reasoning_parser = "" if self._reasoning_parser == "none" else self._reasoning_parser
        return replace(
            description, tool_call_parser=tool_call_parser, reasoning_parser=reasoning_parser
        )

    def descriptions(self) -> list[ModelDescription]:
        return [self.description(engine) for engine in self.engines]

    def load(self) -> LoadInfo:
        """Running, waiting and capacity summed over the engines."""
        loads = [engine.load() for engine in self.engines]
        return LoadInfo(
            running=sum(load.running for load in loads),
            waiting=sum(load.waiting for load in loads),
            capacity=sum(load.capacity for load in loads),
        )


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """Serves a ModelRegistry over gRPC and counts calls in flight so shutdown can drain them."""

    def __init__(self, models: ModelRegistry, *, seed: int | None = None) -> None:
        self._models = models
        # The sampling seed of requests that bring none (the worker's --seed).
        self._seed = seed
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def start_draining(self) -> None:
        """Refuse new work (UNAVAILABLE); calls already running go on."""
        self._draining = True

    async def wait_idle(self) -> None:
        """Return once no call is in flight."""
        await self._idle.wait()

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        with self._call(new_work=True):
            engine = self._models.get(request.model)
            description = self._models.description(engine)
            defaults = description.default_sampling
            if self._seed is not None:
                defaults = replace(defaults, seed=self._seed)
            generation = convert.to_generation_request(request, defaults)
            # Tool calls and reasoning are parsed here, not in the engine: the engine streams
            # plain text, and parsing is cheap string work per chunk.
            parser = create_output_parser(
                description.tool_call_parser,
                description.reasoning_parser,
                convert.to_tool_choice(request),
            )
            stream = engine.generate(generation)
            # Close the engine's stream whenever this one ends, also when the client goes away
            # mid-stream and gRPC closes this generator while it waits at `yield`: that is what
            # frees the request's batch slot.
            async with _closing(stream):
                async for chunk in stream:
                    yield convert.to_generate_response(parser.parse(chunk))

    async def Embed(
        self, request: worker_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.EmbedResponse:
        with self._call(new_work=True):
            engine = self._models.get(request.model)
            if not self._models.description(engine).supports_embeddings:
                raise InvalidRequestError(
                    f"the model '{request.model}' does not produce embeddings", param="model"
                )
            vectors, tokens = await engine.embed(convert.to_embed_inputs(request))
            return convert.to_embed_response(vectors, tokens)

    async def Tokenize(
        self, request: worker_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.TokenizeResponse:
        with self._call(new_work=True):
            engine = self._models.get(request.model)
            prompt = convert.to_tokenize_prompt(request)
            ids = await engine.tokenize(prompt)
            return worker_pb2.TokenizeResponse(
                token_ids=ids,
                count=len(ids),
                context_length=self._models.description(engine).context_length,
            )

    async def GetModelInfo(
        self, request: worker_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetModelInfoResponse:
        with self._call(new_work=False):
            if request.model:
                descriptions = [self._models.description(self._models.get(request.model))]
            else:
                descriptions = self._models.descriptions()
            return worker_pb2.GetModelInfoResponse(
                models=[convert.to_model_info(d) for d in descriptions]
            )

    async def GetLoad(
        self, request: worker_pb2.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetLoadResponse:
        with self._call(new_work=False):
            return worker_pb2.GetLoadResponse(load=convert.to_load(self._models.load()))

    @contextlib.contextmanager
    def _call(self, *, new_work: bool) -> Iterator[None]:
        """Count a call in flight; refuse it while loading, and refuse new work while draining."""
        if self._draining and (new_work or not self._models.started):
            raise UnavailableError("the worker is shutting down; retry on another worker")
        if not self._models.started:
            raise UnavailableError("the worker is still loading its models; retry shortly")
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()


@contextlib.asynccontextmanager
async def _closing(stream: AsyncIterator[object]) -> AsyncIterator[None]:
    """Close an engine stream (an async generator, as a rule) when the block ends."""
    try:
        yield
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
