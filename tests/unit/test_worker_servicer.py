"""WorkerService over real gRPC with FakeEngines: streaming, cancellation, errors, lifecycle."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from chatfleet.v1 import worker_pb2, worker_pb2_grpc
from services.common.errors import OverloadedError
from services.common.grpc_errors import field_of
from services.common.grpc_server import GrpcServer, create_server, insecure_channel
from services.worker.engine.interface import ConstraintKind, Conversation, GenerationChunk
from services.worker.main import SERVICE_NAME, Worker
from services.worker.servicer import ModelRegistry, WorkerServicer
from tests.unit.fakes import FakeEngine, worker_config
from tests.unit.fakes import chunk as fake_chunk
from tests.unit.fakes import final_chunk as fake_final

WAIT_S = 10.0


def chat_request(model: str = "fake-chat", **fields: object) -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(
        model=model,
        chat=worker_pb2.ChatMessages(
            messages=[worker_pb2.ChatMessage(role="user", content="Hi there")]
        ),
        **fields,  # type: ignore[arg-type]
    )


@dataclass
class Running:
    """A servicer behind a real server, and a stub talking to it."""

    servicer: WorkerServicer
    models: ModelRegistry
    server: GrpcServer
    stub: worker_pb2_grpc.WorkerServiceStub


@pytest.fixture
async def chat_engine() -> FakeEngine:
    return FakeEngine("fake-chat", aliases=("fc",), capacity=4)


@pytest.fixture
async def embed_engine() -> FakeEngine:
    return FakeEngine("fake-embed", generates=False, capacity=2, context_length=512)


@pytest.fixture
async def running(chat_engine: FakeEngine, embed_engine: FakeEngine) -> AsyncIterator[Running]:
    """The servicer with its models not started yet: tests start them (or not)."""
    models = ModelRegistry([chat_engine, embed_engine])
    servicer = WorkerServicer(models)
    server = create_server("127.0.0.1", 0, [SERVICE_NAME])
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server.server)
    await server.start()
    try:
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield Running(servicer, models, server, worker_pb2_grpc.WorkerServiceStub(channel))
    finally:
        await server.server.stop(None)


@pytest.fixture
async def ready(running: Running) -> Running:
    await running.models.start()
    return running


async def read_rest(call: grpc.aio.UnaryStreamCall) -> list[worker_pb2.GenerateResponse]:
    """The rest of a stream, with read(): gRPC forbids mixing read() and `async for` on a call."""
    replies = []
    while (reply := await call.read()) is not grpc.aio.EOF:
        assert isinstance(reply, worker_pb2.GenerateResponse)
        replies.append(reply)
    return replies


async def failure(call: object) -> grpc.aio.AioRpcError:
    """The error a unary call or a whole stream ends with."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        if isinstance(call, grpc.aio.UnaryStreamCall):
            await read_rest(call)
        else:
            await call  # type: ignore[misc]
    return caught.value


async def test_generate_streams_the_engine_chunks(ready: Running, chat_engine: FakeEngine) -> None:
    replies = [
        reply
        async for reply in ready.stub.Generate(
            chat_request(
                request_id="req-1",
                sampling=worker_pb2.SamplingParams(temperature=0.0, seed=7, top_k=5),
                stopping=worker_pb2.StoppingCriteria(max_tokens=9, stop=["\n"]),
                logprobs=worker_pb2.LogprobsParams(enabled=True, top_logprobs=2),
            )
        )
    ]
    assert [r.text for r in replies] == ["Hello", ",", " world"]
    assert [list(r.token_ids) for r in replies] == [[1], [2], [3]]
    assert [r.finish_reason for r in replies] == [
        worker_pb2.FINISH_REASON_UNSPECIFIED,
        worker_pb2.FINISH_REASON_UNSPECIFIED,
        worker_pb2.FINISH_REASON_STOP,
    ]
    assert not replies[0].HasField("usage")
    assert (replies[-1].usage.prompt_tokens, replies[-1].usage.completion_tokens) == (3, 3)
    (seen,) = chat_engine.requests
    assert seen.request_id == "req-1"
    assert [(m.role, m.content) for m in seen.prompt] == [("user", "Hi there")]  # type: ignore[union-attr]
    assert (seen.sampling.temperature, seen.sampling.seed, seen.sampling.top_k) == (0.0, 7, 5)
    assert seen.sampling.top_p == 1.0  # unset: the default
    assert (seen.stopping.max_tokens, seen.stopping.stop) == (9, ("\n",))
    assert seen.logprobs == 2


async def test_generate_answers_to_aliases(ready: Running, chat_engine: FakeEngine) -> None:
    request = worker_pb2.GenerateRequest(model="fc", text="Once upon a time")
    replies = [reply async for reply in ready.stub.Generate(request)]
    assert replies[-1].finish_reason == worker_pb2.FINISH_REASON_STOP
    assert chat_engine.requests[0].prompt == "Once upon a time"
    assert chat_engine.requests[0].request_id  # generated when the caller gave none


async def test_client_cancellation_closes_the_engine_stream(
    ready: Running, chat_engine: FakeEngine
) -> None:
    chat_engine.hold_after = 1
    call = ready.stub.Generate(chat_request())
    first = await call.read()
    assert isinstance(first, worker_pb2.GenerateResponse)
    assert first.text == "Hello"
    await asyncio.wait_for(chat_engine.held.wait(), WAIT_S)
    assert chat_engine.running == 1
    call.cancel()
    await asyncio.wait_for(chat_engine.stream_closed.wait(), WAIT_S)
    assert chat_engine.running == 0
    await asyncio.wait_for(ready.servicer.wait_idle(), WAIT_S)


async def test_client_cancellation_closes_a_stream_that_never_waits(
    ready: Running, chat_engine: FakeEngine
) -> None:
    # The engine yields without awaiting, so the cancellation lands while the server sends.
    chat_engine.endless = True
    call = ready.stub.Generate(chat_request())
    for _ in range(3):
        await call.read()
    call.cancel()
    await asyncio.wait_for(chat_engine.stream_closed.wait(), WAIT_S)
    assert chat_engine.running == 0
    await asyncio.wait_for(ready.servicer.wait_idle(), WAIT_S)


async def test_unknown_model_is_not_found(ready: Running) -> None:
    error = await failure(ready.stub.Generate(chat_request(model="missing")))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert field_of(error) == "model"
    error = await failure(ready.stub.GetModelInfo(worker_pb2.GetModelInfoRequest(model="nope")))
    assert error.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("request_message", "field"),
    [
        (worker_pb2.GenerateRequest(model="fake-chat"), "prompt"),
        (worker_pb2.GenerateRequest(model="", text="hi"), "model"),
        (worker_pb2.GenerateRequest(model="fake-chat", text=""), "prompt"),
        (worker_pb2.GenerateRequest(model="fake-chat", chat=worker_pb2.ChatMessages()), "messages"),
        (
            worker_pb2.GenerateRequest(
                model="fake-chat",
                chat=worker_pb2.ChatMessages(
                    messages=[worker_pb2.ChatMessage(role="wizard", content="hi")]
                ),
            ),
            "messages",
        ),
        (chat_request(sampling=worker_pb2.SamplingParams(temperature=-1)), "temperature"),
        (chat_request(sampling=worker_pb2.SamplingParams(top_p=0)), "top_p"),
        (chat_request(sampling=worker_pb2.SamplingParams(top_p=1.5)), "top_p"),
        (chat_request(sampling=worker_pb2.SamplingParams(min_p=2)), "min_p"),
        (
            chat_request(sampling=worker_pb2.SamplingParams(repetition_penalty=0)),
            "repetition_penalty",
        ),
        (
            chat_request(sampling=worker_pb2.SamplingParams(presence_penalty=2.5)),
            "presence_penalty",
        ),
        (
            chat_request(sampling=worker_pb2.SamplingParams(frequency_penalty=-3)),
            "frequency_penalty",
        ),
        (chat_request(stopping=worker_pb2.StoppingCriteria(max_tokens=0)), "max_tokens"),
        (
            chat_request(stopping=worker_pb2.StoppingCriteria(max_tokens=2, min_tokens=3)),
            "min_tokens",
        ),
        (chat_request(stopping=worker_pb2.StoppingCriteria(stop=["ok", ""])), "stop"),
        (
            chat_request(logprobs=worker_pb2.LogprobsParams(enabled=True, top_logprobs=21)),
            "top_logprobs",
        ),
        (chat_request(logprobs=worker_pb2.LogprobsParams(top_logprobs=2)), "top_logprobs"),
        (chat_request(model="fake-embed"), "model"),  # the engine refuses: it cannot generate
    ],
)
async def test_bad_generate_requests_are_invalid_argument_naming_the_field(
    ready: Running, request_message: worker_pb2.GenerateRequest, field: str
) -> None:
    error = await failure(ready.stub.Generate(request_message))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(error) == field


async def test_overloaded_engine_is_resource_exhausted(
    ready: Running, chat_engine: FakeEngine
) -> None:
    chat_engine.error = OverloadedError("the queue is full")
    error = await failure(ready.stub.Generate(chat_request()))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "the queue is full"


async def test_everything_is_unavailable_until_the_engines_started(running: Running) -> None:
    calls = [
        running.stub.Generate(chat_request()),
        running.stub.Embed(worker_pb2.EmbedRequest(model="fake-embed", inputs=["a"])),
        running.stub.Tokenize(worker_pb2.TokenizeRequest(model="fake-chat", text="a")),
        running.stub.GetModelInfo(worker_pb2.GetModelInfoRequest()),
        running.stub.GetLoad(worker_pb2.GetLoadRequest()),
    ]
    for call in calls:
        assert (await failure(call)).code() == grpc.StatusCode.UNAVAILABLE
    await running.models.start()
    replies = [reply async for reply in running.stub.Generate(chat_request())]
    assert replies[-1].finish_reason == worker_pb2.FINISH_REASON_STOP


async def test_draining_refuses_new_work_and_lets_streams_finish(
    ready: Running, chat_engine: FakeEngine
) -> None:
    chat_engine.hold_after = 1
    in_flight = ready.stub.Generate(chat_request())
    assert (await in_flight.read()).text == "Hello"  # type: ignore[union-attr]
    ready.servicer.start_draining()

    error = await failure(ready.stub.Generate(chat_request()))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    load = await ready.stub.GetLoad(worker_pb2.GetLoadRequest())
    assert load.load.running == 1
    assert ready.servicer.in_flight == 1

    chat_engine.release.set()
    rest = await read_rest(in_flight)
    assert rest[-1].finish_reason == worker_pb2.FINISH_REASON_STOP
    await asyncio.wait_for(ready.servicer.wait_idle(), WAIT_S)


async def test_embed_returns_one_vector_per_input(ready: Running) -> None:
    reply = await ready.stub.Embed(
        worker_pb2.EmbedRequest(model="fake-embed", inputs=["one two", "three"])
    )
    assert [list(e.values) for e in reply.embeddings] == [[1.0, 0.0], [1.0, 0.0]]
    assert reply.prompt_tokens == 3


@pytest.mark.parametrize("inputs", [[], ["fine", ""]])
async def test_embed_needs_non_empty_inputs(ready: Running, inputs: list[str]) -> None:
    error = await failure(
        ready.stub.Embed(worker_pb2.EmbedRequest(model="fake-embed", inputs=inputs))
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(error) == "input"


async def test_tokenize_counts_tokens_and_reports_context_length(ready: Running) -> None:
    reply = await ready.stub.Tokenize(
        worker_pb2.TokenizeRequest(model="fake-chat", text="one two three")
    )
    assert (list(reply.token_ids), reply.count, reply.context_length) == ([1, 2, 3], 3, 2048)
    chat = await ready.stub.Tokenize(
        worker_pb2.TokenizeRequest(
            model="fake-embed",
            chat=worker_pb2.ChatMessages(
                messages=[worker_pb2.ChatMessage(role="user", content="x")]
            ),
        )
    )
    assert (chat.count, chat.context_length) == (1, 512)
    error = await failure(ready.stub.Tokenize(worker_pb2.TokenizeRequest(model="fake-chat")))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_model_info_and_load(ready: Running) -> None:
    info = await ready.stub.GetModelInfo(worker_pb2.GetModelInfoRequest())
    assert [(m.name, list(m.aliases)) for m in info.models] == [
        ("fake-chat", ["fc"]),
        ("fake-embed", []),
    ]
    one = await ready.stub.GetModelInfo(worker_pb2.GetModelInfoRequest(model="fc"))
    assert [m.name for m in one.models] == ["fake-chat"]
    load = await ready.stub.GetLoad(worker_pb2.GetLoadRequest())
    assert (load.load.running, load.load.waiting, load.load.capacity) == (0, 0, 6)


async def test_two_models_with_one_name_are_refused() -> None:
    models = ModelRegistry([FakeEngine("same"), FakeEngine("other", aliases=("same",))])
    with pytest.raises(ValueError, match="same"):
        await models.start()


# --- the assembled worker (services.worker.main.Worker) --------------------------------------


@pytest.fixture
async def worker(chat_engine: FakeEngine, embed_engine: FakeEngine) -> AsyncIterator[Worker]:
    started = await Worker.start(worker_config(), engines=[chat_engine, embed_engine])
    try:
        yield started
    finally:
        await started.stop()


async def test_worker_serves_health_and_reflection(worker: Worker) -> None:
    async with insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "chatfleet.v1.WorkerService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for response in reflection.ServerReflectionInfo(iter([request])):
            names = {service.name for service in response.list_services_response.service}
    assert {"chatfleet.v1.WorkerService", "grpc.health.v1.Health"} <= names


async def test_worker_stop_goes_not_serving_and_drains_in_flight_streams(
    worker: Worker, chat_engine: FakeEngine
) -> None:
    chat_engine.hold_after = 1
    async with insecure_channel(f"127.0.0.1:{worker.port}") as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING  # type: ignore[union-attr]
        stream = stub.Generate(chat_request())
        assert (await stream.read()).text == "Hello"  # type: ignore[union-attr]

        stopping = asyncio.create_task(worker.stop())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING  # type: ignore[union-attr]
        assert not stopping.done()
        chat_engine.release.set()
        rest = await read_rest(stream)
        assert rest[-1].finish_reason == worker_pb2.FINISH_REASON_STOP
        await asyncio.wait_for(stopping, WAIT_S)
    assert chat_engine.stopped


async def test_worker_stop_cancels_streams_left_after_the_grace_period(
    chat_engine: FakeEngine,
) -> None:
    chat_engine.hold_after = 1
    worker = await Worker.start(worker_config(shutdown_grace=0), engines=[chat_engine])
    try:
        async with insecure_channel(f"127.0.0.1:{worker.port}") as channel:
            stream = worker_pb2_grpc.WorkerServiceStub(channel).Generate(chat_request())
            assert (await stream.read()).text == "Hello"  # type: ignore[union-attr]
            await worker.stop()
            await asyncio.wait_for(chat_engine.stream_closed.wait(), WAIT_S)
            error = await failure(stream)
            assert error.code() in {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}
    finally:
        await worker.stop()
    assert chat_engine.running == 0


WEATHER_TOOL = worker_pb2.ToolDefinition(
    name="get_weather",
    description="The weather in a city.",
    parameters_json='{"type": "object", "properties": {"city": {"type": "string"}}}',
)


def tool_request(**fields: object) -> worker_pb2.GenerateRequest:
    return worker_pb2.GenerateRequest(
        model="tools",
        chat=worker_pb2.ChatMessages(
            messages=[worker_pb2.ChatMessage(role="user", content="Weather in Paris?")],
            tools=[WEATHER_TOOL],
        ),
        **fields,  # type: ignore[arg-type]
    )


async def serve(engine: FakeEngine, **registry: str) -> AsyncIterator[Running]:
    models = ModelRegistry([engine], **registry)
    servicer = WorkerServicer(models)
    server = create_server("127.0.0.1", 0, [SERVICE_NAME])
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, server.server)
    await server.start()
    await models.start()
    try:
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            yield Running(servicer, models, server, worker_pb2_grpc.WorkerServiceStub(channel))
    finally:
        await server.server.stop(None)


HERMES_SCRIPT = (
    fake_chunk("Checking. <tool", 1),
    fake_chunk('_call>{"name": "get_weather", "arguments": {"city": ', 2),
    fake_chunk('"Paris"}}</tool_call>', 3),
    fake_final("", 4),
)


async def test_tool_calls_are_parsed_from_the_engine_text() -> None:
    engine = FakeEngine("tools", script=HERMES_SCRIPT)
    async for running in serve(engine):
        replies = [reply async for reply in running.stub.Generate(tool_request())]
    assert "".join(r.text for r in replies) == "Checking. "
    deltas = [d for r in replies for d in r.tool_calls]
    assert deltas[0].index == 0 and deltas[0].name == "get_weather"
    assert deltas[0].id.startswith("call_") and len(deltas[0].id) == 29
    assert json.loads("".join(d.arguments for d in deltas)) == {"city": "Paris"}
    assert [list(r.token_ids) for r in replies] == [[1], [2], [3], [4]]
    assert replies[-1].finish_reason == worker_pb2.FINISH_REASON_TOOL_CALLS
    (seen,) = engine.requests
    assert isinstance(seen.prompt, Conversation)
    assert [t.name for t in seen.prompt.tools] == ["get_weather"]
    assert seen.constraint is None


async def test_a_named_tool_choice_forces_its_schema() -> None:
    engine = FakeEngine("tools", script=(fake_chunk('{"city": "Paris"}', 1), fake_final()))
    choice = worker_pb2.ToolChoice(mode=worker_pb2.TOOL_CHOICE_MODE_NAMED, name="get_weather")
    async for running in serve(engine):
        replies = [reply async for reply in running.stub.Generate(tool_request(tool_choice=choice))]
    (seen,) = engine.requests
    assert seen.constraint is not None and seen.constraint.kind is ConstraintKind.JSON_SCHEMA
    assert json.loads(seen.constraint.spec) == json.loads(WEATHER_TOOL.parameters_json)
    deltas = [d for r in replies for d in r.tool_calls]
    assert deltas[0].name == "get_weather"
    assert "".join(d.arguments for d in deltas) == '{"city": "Paris"}'
    assert replies[-1].finish_reason == worker_pb2.FINISH_REASON_TOOL_CALLS


async def test_tool_choice_none_leaves_tools_out_and_text_alone() -> None:
    engine = FakeEngine("tools", script=HERMES_SCRIPT)
    choice = worker_pb2.ToolChoice(mode=worker_pb2.TOOL_CHOICE_MODE_NONE)
    async for running in serve(engine):
        replies = [reply async for reply in running.stub.Generate(tool_request(tool_choice=choice))]
    assert "".join(r.text for r in replies).endswith("</tool_call>")
    assert replies[-1].finish_reason == worker_pb2.FINISH_REASON_STOP
    assert isinstance(engine.requests[0].prompt, list)


async def test_reasoning_is_split_when_the_prompt_opens_it() -> None:
    script = (
        GenerationChunk(text="thinking", token_ids=[1], reasoning_open=True),
        fake_chunk("</think>\n\nAnswer", 2),
        fake_final(),
    )
    engine = FakeEngine("tools", script=script)
    async for running in serve(engine, reasoning_parser="think"):
        replies = [reply async for reply in running.stub.Generate(tool_request())]
        info = await running.stub.GetModelInfo(worker_pb2.GetModelInfoRequest(model="tools"))
    assert "".join(r.reasoning_text for r in replies) == "thinking"
    assert "".join(r.text for r in replies) == "Answer"
    (model,) = info.models
    assert (model.tool_call_parser, model.reasoning_parser) == ("hermes", "think")


async def test_parser_flags_override_the_models_detection() -> None:
    engine = FakeEngine("tools")
    engine._description = dataclasses.replace(
        engine.description, tool_call_parser="hermes", reasoning_parser="think"
    )
    models = ModelRegistry([engine], tool_call_parser="mistral", reasoning_parser="none")
    (described,) = models.descriptions()
    assert (described.tool_call_parser, described.reasoning_parser) == ("mistral", "")
    (auto,) = ModelRegistry([engine]).descriptions()
    assert (auto.tool_call_parser, auto.reasoning_parser) == ("hermes", "think")
    (embedder,) = ModelRegistry([FakeEngine("e", generates=False)]).descriptions()
    assert (embedder.tool_call_parser, embedder.reasoning_parser) == ("", "")


async def test_bad_tool_requests_name_the_field() -> None:
    engine = FakeEngine("tools")
    unknown = worker_pb2.ToolChoice(mode=worker_pb2.TOOL_CHOICE_MODE_NAMED, name="nope")
    async for running in serve(engine):
        error = await failure(running.stub.Generate(tool_request(tool_choice=unknown)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_of(error) == "tool_choice"


def test_parser_flags_and_their_environment_fallbacks() -> None:
    import argparse

    from services.worker.config import WorkerConfig, add_arguments

    def parse(argv: list[str], environ: dict[str, str]) -> WorkerConfig:
        parser = argparse.ArgumentParser()
        add_arguments(parser, environ)
        return WorkerConfig.from_namespace(parser.parse_args(["--model-path", "/m", *argv]))

    default = parse([], {})
    assert (default.tool_call_parser, default.reasoning_parser) == ("auto", "auto")
    env = {"CHATFLEET_TOOL_CALL_PARSER": "mistral", "CHATFLEET_REASONING_PARSER": "none"}
    from_env = parse([], env)
    assert (from_env.tool_call_parser, from_env.reasoning_parser) == ("mistral", "none")
    flags = parse(["--tool-call-parser", "llama3_json", "--reasoning-parser", "think"], env)
    assert (flags.tool_call_parser, flags.reasoning_parser) == ("llama3_json", "think")
    with pytest.raises(SystemExit):
        parse(["--tool-call-parser", "xml"], {})
