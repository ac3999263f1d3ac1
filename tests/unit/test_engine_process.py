"""Engines in child processes (services/worker/engine_process/), on a tiny random Llama and a tiny
BERT: the same answers as in the worker's own process, errors with their types, cancellation,
replicas sharing the load, and what happens when either side of the pipe dies."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest
from models import save_tiny_bert, save_tiny_llama

from services.common.errors import InvalidRequestError, UnavailableError
from services.worker.config import WorkerConfig, add_arguments
from services.worker.engine.factory import create_engine
from services.worker.engine.interface import (
    ChatMessage,
    Conversation,
    Engine,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    StoppingParams,
)
from services.worker.engine.loading import EngineOptions, ModelSpec
from services.worker.engine_process import sizing
from services.worker.engine_process.host import EngineChildHost
from services.worker.engine_process.pipe import Op
from services.worker.engine_process.replicas import (
    AFFINITY_SLACK,
    ReplicaPool,
    create_process_engines,
    prefix_key,
)
from services.worker.engine_process.sizing import auto_replicas

REPO = Path(__file__).resolve().parents[2]
EXIT_WAIT_S = 30.0


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


def specs(llama_dir: Path, bert_dir: Path) -> list[ModelSpec]:
    return [ModelSpec(str(llama_dir), ("tiny",)), ModelSpec(str(bert_dir), ("tiny-embed",))]


OPTIONS = EngineOptions(threads=1, max_running=4, quantization="none")


def texts_for_each_replica(count: int) -> list[str]:
    """One prompt text per replica: text i's prefix key maps to replica i."""
    found: dict[int, str] = {}
    n = 0
    while len(found) < count:
        text = f"hello {n}"
        key = prefix_key(text)
        assert key is not None
        found.setdefault(key % count, text)
        n += 1
    return [found[i] for i in range(count)]


def test_the_child_has_a_handler_for_every_operation() -> None:
    host = EngineChildHost(None, [])  # type: ignore[arg-type]
    assert set(host._handlers) == set(Op)


def test_prefix_keys_follow_the_start_of_a_conversation() -> None:
    """The turns of one chat share a key (its first messages stay as the history grows), so they
    are routed to the replica whose prefix cache holds the history."""
    first = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")]
    later = [*first, ChatMessage("assistant", "Hello!"), ChatMessage("user", "Why?")]
    assert prefix_key(first) == prefix_key(later) == prefix_key(Conversation(tuple(later)))
    assert prefix_key(first) != prefix_key(
        [ChatMessage("system", "Be brief."), ChatMessage("user", "Yo")]
    )
    assert prefix_key("a" * 300 + "x") == prefix_key("a" * 300 + "y")
    assert prefix_key([1, 2, 3]) != prefix_key([1, 2, 4])
    assert prefix_key("") is None


def requests() -> list[GenerationRequest]:
    """Greedy and seeded requests of different lengths, joining the batch together."""
    out = []
    for i in range(6):
        sampling = (
            SamplingParams(temperature=0.0)
            if i % 2 == 0
            else SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i)
        )
        out.append(
            GenerationRequest(
                request_id=f"r{i}",
                prompt="The quick brown fox " * (1 + i),
                sampling=sampling,
                stopping=StoppingParams(max_tokens=6 + 3 * i, ignore_eos=True),
            )
        )
    return out


async def collect(engine: Engine, request: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in engine.generate(request)]


def token_ids(chunks: Sequence[GenerationChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def wait_exit(pid: int) -> None:
    """Block until process `pid` (not necessarily our child) has ended."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        ready, _, _ = select.select([fd], [], [], EXIT_WAIT_S)
        assert ready, f"process {pid} still runs after {EXIT_WAIT_S}s"
    finally:
        os.close(fd)


async def test_replicas_answer_as_the_engine_does_in_process(
    llama_dir: Path, bert_dir: Path
) -> None:
    local = [create_engine(spec, OPTIONS) for spec in specs(llama_dir, bert_dir)]
    for engine in local:
        await engine.start()
    try:
        expected = [await collect(local[0], r) for r in requests()]
        expected_tokens = await local[0].tokenize([ChatMessage("user", "Hello there")])
        expected_vectors = await local[1].embed(["hello world", "the lazy dog"])
    finally:
        for engine in local:
            await engine.stop()

    chat, embed = create_process_engines(specs(llama_dir, bert_dir), OPTIONS, replicas=2)
    assert isinstance(chat, ReplicaPool) and chat.replicas == 2
    await chat.start()
    await embed.start()
    pids = [p._process.pid for p in chat._processes if p._process and p._process.pid]
    try:
        assert chat.description.name == "tiny" and chat.description.context_length == 256
        assert embed.description.supports_generate is False
        # All at once: they spread over both replicas, and each answer is the lone answer.
        got = await asyncio.gather(*(collect(chat, r) for r in requests()))
        for mine, theirs in zip(got, expected, strict=True):
            assert token_ids(mine) == token_ids(theirs)
            assert "".join(c.text for c in mine) == "".join(c.text for c in theirs)
            assert mine[-1].finish_reason == theirs[-1].finish_reason
        stats = chat.stats()
        assert stats.generation_tokens == sum(len(token_ids(c)) for c in expected)
        assert (stats.running, stats.waiting, stats.kv_cache_usage) == (0, 0, 0.0)
        assert chat.load().capacity == 4  # two replicas of two each: the configured total

        assert await chat.tokenize([ChatMessage("user", "Hello there")]) == expected_tokens
        assert await embed.embed(["hello world", "the lazy dog"]) == expected_vectors

        # Errors come back with their types and fields.
        bad = GenerationRequest("bad", "hi", sampling=SamplingParams(temperature=-1.0))
        with pytest.raises(InvalidRequestError) as caught:
            await collect(chat, bad)
        assert caught.value.param == "temperature"
        with pytest.raises(InvalidRequestError, match="embedding model"):
            await collect(embed, GenerationRequest("e", "hi"))

        # Requests sharing a prefix go to its replica until that one is AFFINITY_SLACK busier
        # than the other; then the load spreads. Closing a stream frees its slot.
        long = StoppingParams(max_tokens=200, ignore_eos=True)
        text = texts_for_each_replica(2)[0]
        streams = []
        for i in range(AFFINITY_SLACK + 2):  # each one streaming before the next is routed
            streams.append(chat.generate(GenerationRequest(f"l{i}", text, stopping=long)))
            await anext(streams[-1])
        assert [p.active_generations(0) for p in chat._processes] == [AFFINITY_SLACK + 1, 1]
        assert chat.load().running == AFFINITY_SLACK + 2
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]
        # Draining returns once every child has confirmed the cancellations.
        await chat.drain()
        assert chat.load().running == 0
        assert chat.stats().running == 0
    finally:
        await chat.stop()
        await embed.stop()
    for pid in pids:
        wait_exit(pid)


async def test_a_dead_engine_process_fails_its_calls_and_the_engine(llama_dir: Path) -> None:
    (chat,) = create_process_engines([ModelSpec(str(llama_dir), ("tiny",))], OPTIONS)
    await chat.start()
    failure = asyncio.ensure_future(chat.failure())
    try:
        long = StoppingParams(max_tokens=200, ignore_eos=True)
        stream = chat.generate(GenerationRequest("l", "hello", stopping=long))
        await anext(stream)
        process = chat._processes[0]._process
        assert process is not None and process.pid is not None
        os.kill(process.pid, signal.SIGKILL)
        with pytest.raises(UnavailableError, match="engine process exited"):
            async for _ in stream:
                pass
        why = await asyncio.wait_for(failure, EXIT_WAIT_S)
        assert f"exit code {-signal.SIGKILL}" in why
        with pytest.raises(UnavailableError, match="has failed"):
            await chat.tokenize("hello")
        assert chat.load().running == 0
    finally:
        await asyncio.wait_for(chat.stop(), EXIT_WAIT_S)


ORPHAN_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, time
    from services.worker.engine_process.replicas import create_process_engines
    from services.worker.engine.loading import EngineOptions, ModelSpec

    async def main():
        (chat,) = create_process_engines(
            [ModelSpec(sys.argv[1], ("tiny",))], EngineOptions(threads=1, quantization="none")
        )
        await chat.start()
        print(chat._processes[0]._process.pid, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def test_the_engine_process_exits_when_the_worker_is_killed(llama_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    worker = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_SCRIPT, str(llama_dir)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    try:
        assert worker.stdout is not None
        child = int(worker.stdout.readline())
    finally:
        worker.kill()
        worker.wait()
    wait_exit(child)  # it read end-of-file on its pipe and left


def test_auto_replicas(llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ModelSpec(str(llama_dir))
    monkeypatch.setattr(sizing, "usable_cores", lambda: 2)
    monkeypatch.setattr(sizing, "_physical_memory", lambda: 64 << 30)
    assert auto_replicas([spec], EngineOptions(device="cpu")) == 2
    # An explicit thread count asks for one process with that many threads.
    assert auto_replicas([spec], EngineOptions(device="cpu", threads=2)) == 1
    # Copies of the weights must stay under a quarter of the memory.
    weights = sizing._estimated_weight_bytes(spec)
    monkeypatch.setattr(sizing, "_physical_memory", lambda: 4 * weights + 1)
    assert auto_replicas([spec], EngineOptions(device="cpu")) == 1
    monkeypatch.setattr(sizing, "usable_cores", lambda: 1)
    monkeypatch.setattr(sizing, "_physical_memory", lambda: 64 << 30)
    assert auto_replicas([spec], EngineOptions(device="cpu")) == 1


def test_replicas_share_the_configured_budgets(llama_dir: Path) -> None:
    options = EngineOptions(max_running=5, max_waiting=7, kv_cache_tokens=1001, threads=None)
    (chat,) = create_process_engines([ModelSpec(str(llama_dir))], options, replicas=2)
    assert isinstance(chat, ReplicaPool)
    shares = [p._options for p in chat._processes]
    assert {(s.max_running, s.max_waiting, s.kv_cache_tokens) for s in shares} == {(3, 4, 501)}
    assert all(s.threads is not None and s.threads >= 1 for s in shares)
    assert chat.load().capacity == 6
    with pytest.raises(ValueError, match="at least 1"):
        create_process_engines([ModelSpec(str(llama_dir))], options, replicas=0)


async def test_cpu_replicas_sized_here_share_a_busy_counter_and_serve_with_it(
    llama_dir: Path,
) -> None:
    """Without --threads, CPU replicas get one counter of busy processes (engine/cores.py): it
    crosses the spawn and the engines serve with it; an explicit thread count keeps none."""
    options = EngineOptions(max_running=4, quantization="none", device="cpu")
    (chat,) = create_process_engines([ModelSpec(str(llama_dir), ("tiny",))], options, replicas=2)
    assert isinstance(chat, ReplicaPool)
    counters = {id(p._busy_processes) for p in chat._processes}
    assert len(counters) == 1 and chat._processes[0]._busy_processes is not None
    (fixed,) = create_process_engines([ModelSpec(str(llama_dir))], OPTIONS, replicas=2)
    assert isinstance(fixed, ReplicaPool)
    assert all(p._busy_processes is None for p in fixed._processes)
    await chat.start()
    try:
        chunks = await asyncio.gather(*(collect(chat, r) for r in requests()))
        assert all(c and c[-1].finish_reason is not None for c in chunks)
    finally:
        await chat.stop()
    counter = chat._processes[0]._busy_processes
    assert counter is not None and counter.value == 0  # every process idle again


def parse(*argv: str) -> WorkerConfig:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser, {})
    return WorkerConfig.from_namespace(parser.parse_args(["--model-path", "/m", *argv]))


def test_engine_process_flags() -> None:
    assert (parse().engine_process, parse().engine_replicas) == (True, None)
    assert parse("--no-engine-process").engine_process is False
    assert parse("--engine-replicas", "3").engine_replicas == 3
    with pytest.raises(ValueError, match="0 \\(auto\\) or more"):
        parse("--engine-replicas", "-1")
    with pytest.raises(ValueError, match="needs the engine process"):
        parse("--engine-replicas", "2", "--no-engine-process")
