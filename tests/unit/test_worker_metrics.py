"""A worker's Prometheus endpoint on a tiny random Llama served in-process: token counters after
a generation, and the running batch, queue and KV cache gauges while requests are held in place.

To read gauges that cannot move under the test, the engine thread is held between steps by jobs
put on the engine's own queue (a private API on purpose: nothing public pauses an engine)."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from models import save_tiny_llama
from prometheus_text import Scrape

from chatfleet.v1 import worker_pb2, worker_pb2_grpc
from services.common.grpc_server import insecure_channel
from services.worker.config import WorkerConfig
from services.worker.engine.factory import create_engine
from services.worker.engine.hf_engine import HFEngine
from services.worker.engine.interface import (
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    StoppingParams,
)
from services.worker.engine.loading import EngineOptions, ModelSpec
from services.worker.main import Worker

MODEL = "tiny"
WAIT_S = 30.0
PROMPT = [5, 6, 7, 8, 9]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


@asynccontextmanager
async def metered_worker(llama_dir: Path, **options: int) -> AsyncIterator[Worker]:
    """A standalone worker serving the tiny model, its metrics on a free port."""
    spec = ModelSpec(str(llama_dir), (MODEL,))
    engine = create_engine(spec, EngineOptions(threads=1, quantization="none", **options))  # type: ignore[arg-type]
    config = WorkerConfig(models=(spec,), port=0, no_register=True, metrics_port=0)
    worker = await Worker.start(config, engines=[engine])
    try:
        yield worker
    finally:
        await worker.stop()


async def scrape(worker: Worker) -> Scrape:
    assert worker.metrics is not None
    async with httpx.AsyncClient() as client:
        response = await client.get(worker.metrics.url)
    assert response.status_code == 200
    return Scrape(response.text)


def engine_of(worker: Worker) -> HFEngine:
    engine = worker.models.engines[0]
    assert isinstance(engine, HFEngine)
    return engine


class EngineHold:
    """Holds the engine thread inside a job until released; `then` runs on that thread as it
    is released (before the engine's next step)."""

    def __init__(self, engine: HFEngine, then: Callable[[], None] | None = None) -> None:
        self.held = threading.Event()
        self._release = threading.Event()
        self._then = then
        self._engine = engine

    def submit(self) -> EngineHold:
        self._engine._scheduler.submit_job(self._run)
        return self

    def _run(self) -> None:
        self.held.set()
        self._release.wait(WAIT_S)
        if self._then is not None:
            self._then()

    async def wait_held(self) -> None:
        assert await asyncio.to_thread(self.held.wait, WAIT_S)

    def release(self) -> None:
        self._release.set()


def greedy(request_id: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        prompt=PROMPT,
        sampling=SamplingParams(temperature=0.0),
        stopping=StoppingParams(max_tokens=max_tokens, ignore_eos=True),
    )


async def submitted(
    engine: HFEngine, *requests: GenerationRequest
) -> list[tuple[AsyncIterator[GenerationChunk], asyncio.Task[GenerationChunk]]]:
    """Start each request (a task awaiting its first chunk) and return once all are queued."""
    started = []
    for request in requests:
        stream = aiter(engine.generate(request))
        started.append((stream, asyncio.ensure_future(anext(stream))))
    await asyncio.sleep(0)  # let each task reach its tokenizer call
    # The tokenizer thread runs jobs in order: once this one is done, the requests' tokenizer
    # calls are too, and their tasks (woken first) have submitted them.
    await engine._on_tokenizer(lambda: None)
    return started


async def finish(
    started: list[tuple[AsyncIterator[GenerationChunk], asyncio.Task[GenerationChunk]]],
) -> None:
    for stream, first in started:
        await first
        await stream.aclose()  # type: ignore[attr-defined]


async def test_token_counters_after_a_generation_over_grpc(llama_dir: Path) -> None:
    async with metered_worker(llama_dir) as worker:
        before = await scrape(worker)
        async with insecure_channel(f"127.0.0.1:{worker.port}") as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            request = worker_pb2.GenerateRequest(model=MODEL, request_id="count-1")
            request.token_ids.ids.extend(PROMPT)
            request.stopping.max_tokens = 6
            request.stopping.ignore_eos = True
            responses = [r async for r in stub.Generate(request)]
        after = await scrape(worker)
    model = {"model_name": MODEL}
    # The warm-up generation is not counted.
    assert before.value("chatfleet:prompt_tokens_total", **model) == 0
    assert before.value("chatfleet:generation_tokens_total", **model) == 0
    assert responses[-1].usage.completion_tokens == 6
    assert after.value("chatfleet:prompt_tokens_total", **model) == len(PROMPT)
    assert after.value("chatfleet:generation_tokens_total", **model) == 6
    assert after.value("chatfleet:num_requests_running", **model) == 0
    assert after.value("chatfleet:num_requests_waiting", **model) == 0
    # A finished request's cache is freed.
    assert after.value("chatfleet:kv_cache_usage_perc", **model) == 0
    assert after.value("chatfleet:num_preemptions_total", **model) == 0


async def test_queue_running_batch_and_kv_cache_gauges(llama_dir: Path) -> None:
    async with metered_worker(llama_dir, max_running=1, kv_cache_tokens=1024) as worker:
        engine = engine_of(worker)
        model = {"model_name": MODEL}
        first = EngineHold(engine).submit()
        await first.wait_held()
        started = await submitted(engine, greedy("a", 200), greedy("b", 200))
        queued = await scrape(worker)
        assert queued.value("chatfleet:num_requests_waiting", **model) == 2
        assert queued.value("chatfleet:num_requests_running", **model) == 0

        # Released, the engine admits "a" (one slot) and is held again before its first step.
        after_prefill = EngineHold(engine)
        admitted = EngineHold(engine, then=after_prefill.submit)
        admitted.submit()
        first.release()
        await admitted.wait_held()
        joined = await scrape(worker)
        assert joined.value("chatfleet:num_requests_running", **model) == 1
        assert joined.value("chatfleet:num_requests_waiting", **model) == 1
        assert joined.value("chatfleet:kv_cache_usage_perc", **model) == 0

        # One step later "a" has its prompt in the cache and its first token.
        admitted.release()
        await after_prefill.wait_held()
        stepped = await scrape(worker)
        after_prefill.release()
        await finish(started)
    assert stepped.value("chatfleet:num_requests_running", **model) == 1
    # The packed cache reserves positions in blocks of 256 per running sequence.
    assert stepped.value("chatfleet:kv_cache_usage_perc", **model) == 256 / 1024
    assert stepped.value("chatfleet:prompt_tokens_total", **model) == len(PROMPT)
    assert stepped.value("chatfleet:generation_tokens_total", **model) == 1


async def test_preemptions_are_counted_and_logged_with_the_request_id(
    llama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.worker.engine.step_loop")
    # Room in the KV cache for one sequence: the second one admitted is preempted.
    async with metered_worker(llama_dir, max_running=2, kv_cache_tokens=256) as worker:
        engine = engine_of(worker)
        hold = EngineHold(engine).submit()
        await hold.wait_held()
        started = await submitted(engine, greedy("first", 4), greedy("second", 4))
        hold.release()
        await finish(started)
        metrics = await scrape(worker)
    assert metrics.value("chatfleet:num_preemptions_total", model_name=MODEL) >= 1  # type: ignore[operator]
    preempted = [r for r in caplog.records if "preempted" in r.getMessage()]
    assert preempted
    assert {r.request_id for r in preempted} == {"second"}  # type: ignore[attr-defined]
