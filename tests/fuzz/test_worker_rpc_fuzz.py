"""Hypothesis-generated requests to every WorkerService RPC of a real worker serving a tiny random
Llama: each answers OK or a client error (INVALID_ARGUMENT, NOT_FOUND), never INTERNAL or UNKNOWN,
never hangs, and the worker stays healthy with every slot freed."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatfleet.v1 import worker_pb2, worker_pb2_grpc
from services.common.grpc_server import insecure_channel
from tests.fuzz.proto_strategies import float32, messages, mostly, uint32
from tests.unit.models import save_tiny_llama
from tests.unit.tiny_worker import TINY_MODEL, tiny_worker

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Small, so that a request without max_tokens (run to the context) stays quick.
CONTEXT = 64
VOCAB = 512  # save_tiny_llama's default tokenizer
# A hang shows up as DEADLINE_EXCEEDED, which fails the test.
CALL_TIMEOUT_S = 30.0
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}

FUZZ = settings(
    max_examples=100,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

_V1 = "chatfleet.v1."
_TOKEN = mostly(st.integers(0, VOCAB - 1), st.integers(0, 2**32 - 1))
_ROLE = mostly(
    st.sampled_from(["system", "user", "assistant"]),
    st.one_of(st.sampled_from(["tool", "developer", ""]), st.text(max_size=8)),
)
_TEXT = mostly(st.text(min_size=1, max_size=40), st.text(max_size=40))
_STOP = mostly(st.text(min_size=1, max_size=4), st.text(max_size=4))
_REQUESTS_WITH_A_MODEL = (
    "GenerateRequest",
    "EmbedRequest",
    "TokenizeRequest",
    "GetModelInfoRequest",
)
# The served model: requests get past the lookup (unknown models: test_unknown_models).
OVERRIDES = {
    **{f"{_V1}{message}.model": st.just(TINY_MODEL) for message in _REQUESTS_WITH_A_MODEL},
    f"{_V1}GenerateRequest.text": _TEXT,
    f"{_V1}ChatMessage.role": _ROLE,
    f"{_V1}TokenIds.ids": _TOKEN,
    f"{_V1}SamplingParams.temperature": float32(0, 2),
    f"{_V1}SamplingParams.top_p": float32(0.125, 1),
    f"{_V1}SamplingParams.top_k": uint32(VOCAB + 8),
    f"{_V1}SamplingParams.min_p": float32(0, 1),
    f"{_V1}SamplingParams.repetition_penalty": float32(0.5, 2),
    f"{_V1}SamplingParams.presence_penalty": float32(-2, 2),
    f"{_V1}SamplingParams.frequency_penalty": float32(-2, 2),
    f"{_V1}StoppingCriteria.max_tokens": uint32(8),
    f"{_V1}StoppingCriteria.min_tokens": uint32(8),
    f"{_V1}StoppingCriteria.stop": _STOP,
    f"{_V1}StoppingCriteria.stop_token_ids": _TOKEN,
    f"{_V1}LogprobsParams.top_logprobs": uint32(20),
}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama"), max_positions=CONTEXT)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def channel(llama_dir: Path) -> AsyncIterator[grpc.aio.Channel]:
    """One worker for the whole module: the fuzzing also checks that it survives every request."""
    async with tiny_worker(llama_dir) as worker, insecure_channel(worker.address) as channel:
        assert (worker.context_length, worker.vocab_size) == (CONTEXT, VOCAB)
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> worker_pb2_grpc.WorkerServiceStub:
    return worker_pb2_grpc.WorkerServiceStub(channel)


def assert_client_error_at_most(error: grpc.aio.AioRpcError | None, request: object) -> None:
    if error is not None:
        assert error.code() in CLIENT_ERRORS, f"{error.code()}: {error.details()} for {request}"
        assert error.details(), "an error says what is wrong"


async def _unary(call: grpc.aio.UnaryUnaryCall) -> grpc.aio.AioRpcError | None:  # type: ignore[type-arg]
    try:
        await call
    except grpc.aio.AioRpcError as error:
        return error
    return None


async def _stream(
    call: grpc.aio.UnaryStreamCall,  # type: ignore[type-arg]
) -> tuple[grpc.aio.AioRpcError | None, list[worker_pb2.GenerateResponse]]:
    """How a streaming call ended, and what it sent."""
    replies = []
    try:
        async for reply in call:
            replies.append(reply)
    except grpc.aio.AioRpcError as error:
        return error, replies
    return None, replies


@settings(FUZZ, max_examples=200)
@given(request=messages(worker_pb2.GenerateRequest.DESCRIPTOR, OVERRIDES))
async def test_generate(
    stub: worker_pb2_grpc.WorkerServiceStub, request: worker_pb2.GenerateRequest
) -> None:
    error, replies = await _stream(stub.Generate(request, timeout=CALL_TIMEOUT_S))
    assert_client_error_at_most(error, request)
    if error is None:
        assert replies and replies[-1].finish_reason != worker_pb2.FINISH_REASON_UNSPECIFIED
        usage = replies[-1].usage
        assert usage.prompt_tokens + usage.completion_tokens <= CONTEXT


@FUZZ
@given(request=messages(worker_pb2.EmbedRequest.DESCRIPTOR, OVERRIDES))
async def test_embed(
    stub: worker_pb2_grpc.WorkerServiceStub, request: worker_pb2.EmbedRequest
) -> None:
    error = await _unary(stub.Embed(request, timeout=CALL_TIMEOUT_S))
    assert_client_error_at_most(error, request)


@FUZZ
@given(request=messages(worker_pb2.TokenizeRequest.DESCRIPTOR, OVERRIDES))
async def test_tokenize(
    stub: worker_pb2_grpc.WorkerServiceStub, request: worker_pb2.TokenizeRequest
) -> None:
    error = await _unary(stub.Tokenize(request, timeout=CALL_TIMEOUT_S))
    assert_client_error_at_most(error, request)


@FUZZ
@given(
    info=messages(worker_pb2.GetModelInfoRequest.DESCRIPTOR, OVERRIDES),
    load=messages(worker_pb2.GetLoadRequest.DESCRIPTOR, OVERRIDES),
)
async def test_model_info_and_load(
    stub: worker_pb2_grpc.WorkerServiceStub,
    info: worker_pb2.GetModelInfoRequest,
    load: worker_pb2.GetLoadRequest,
) -> None:
    assert_client_error_at_most(await _unary(stub.GetModelInfo(info, timeout=CALL_TIMEOUT_S)), info)
    assert await _unary(stub.GetLoad(load, timeout=CALL_TIMEOUT_S)) is None


@FUZZ
@given(
    model=st.text(max_size=8),
    generate=messages(worker_pb2.GenerateRequest.DESCRIPTOR, OVERRIDES),
    embed=messages(worker_pb2.EmbedRequest.DESCRIPTOR, OVERRIDES),
    tokenize=messages(worker_pb2.TokenizeRequest.DESCRIPTOR, OVERRIDES),
)
async def test_unknown_models(
    stub: worker_pb2_grpc.WorkerServiceStub,
    model: str,
    generate: worker_pb2.GenerateRequest,
    embed: worker_pb2.EmbedRequest,
    tokenize: worker_pb2.TokenizeRequest,
) -> None:
    if model == TINY_MODEL:
        return
    for request in (generate, embed, tokenize):
        request.model = model
    errors = [
        await _unary(stub.Embed(embed, timeout=CALL_TIMEOUT_S)),
        await _unary(stub.Tokenize(tokenize, timeout=CALL_TIMEOUT_S)),
    ]
    if model:  # an empty name asks GetModelInfo for every model
        errors.append(await _unary(stub.GetModelInfo(worker_pb2.GetModelInfoRequest(model=model))))
    errors.append((await _stream(stub.Generate(generate, timeout=CALL_TIMEOUT_S)))[0])
    for error in errors:
        # Unknown model, missing model (""), or a request refused before the lookup.
        assert error is not None and error.code() in CLIENT_ERRORS, error


async def test_the_worker_survived_with_every_slot_free(
    channel: grpc.aio.Channel, stub: worker_pb2_grpc.WorkerServiceStub
) -> None:
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    load = (await stub.GetLoad(worker_pb2.GetLoadRequest())).load
    assert (load.running, load.waiting) == (0, 0)
    request = worker_pb2.GenerateRequest(
        model=TINY_MODEL, text="Hello", stopping=worker_pb2.StoppingCriteria(max_tokens=3)
    )
    replies = [reply async for reply in stub.Generate(request, timeout=CALL_TIMEOUT_S)]
    assert replies[-1].usage.completion_tokens <= 3
