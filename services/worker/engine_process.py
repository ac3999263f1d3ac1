"""The worker's engines in a process of their own, so the model never shares a GIL or a core's
time slices with the gRPC server.

Why: on a CPU the decode step is torch's OpenMP threads working in lock step. In the gRPC
process, every token a stream sends wakes the event loop and gRPC's threads, which take the GIL
from the engine thread and time slices from OpenMP threads at their barriers; with two torch
threads that lost more than the second core gave (bench/README.md). In a process of its own the
engine uses every core, and the serving process only relays requests and chunks. vLLM splits its
API server from its engine core for the same reason.

Shape: the worker process holds one `EngineProcess` (the child process, a pipe and a thread that
reads it) and a `ProcessEngine` per model, which implements the `Engine` interface by sending
calls down the pipe. The child (`_EngineHost`) runs the same engines the worker would otherwise
run in-process, answers calls from its own event loop, and sends back what they produce in one
message per event-loop turn (one per engine step while decoding), each with the engines' counters
for metrics. Generation is cancelled by a message; a request leaves the batch at the next step.

Failure: when the child dies, every call in flight fails with UnavailableError (the gateway retries
a request elsewhere before its first token), new calls are refused, and `failure()` completes so
the worker shuts down and exits non-zero for its supervisor to restart it. When the worker dies,
the child reads end-of-file on the pipe and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import threading
import zlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from services.common.errors import UnavailableError
from services.common.logs import configure_logging, logging_settings
from services.common.request_id import bound_request_id, current_request_id
from services.worker.engine import (
    ChatMessage,
    ChatPrompt,
    Conversation,
    Engine,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
    LoadInfo,
    ModelDescription,
    Prompt,
)
from services.worker.loading import EngineOptions, ModelSpec, plan_load, usable_cores

logger = logging.getLogger(__name__)

# Message kinds, child -> parent, for one call: a generated chunk, the end of a generation
# (finished or cancelled), a unary call's value, an exception.
_CHUNK, _END, _VALUE, _ERROR = "chunk", "end", "value", "error"
# How long the child may take to exit after it was asked to, before it is killed.
_EXIT_TIMEOUT_S = 30.0
_REAP_TIMEOUT_S = 5.0


# (call id, kind, payload)
_Item = tuple[int, str, Any]


@dataclass
class _Call:
    """A call in flight: a stream's queue of (kind, payload), or a unary call's future."""

    engine: int
    queue: asyncio.Queue[tuple[str, Any]] | None = None
    future: asyncio.Future[Any] | None = None


class EngineProcess:
    """The child process that runs every engine of a worker, and the calls in flight to it.

    Started by the first engine's start(); asked to exit once every engine has stopped."""

    def __init__(self, specs: Sequence[ModelSpec], options: EngineOptions) -> None:
        self._specs = tuple(specs)
        self._options = options
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._send_lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._ids = itertools.count(1)
        self._settle_waiters: list[asyncio.Future[None]] = []
        self._stats: list[EngineStats | None] = [None] * len(self._specs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failure: asyncio.Future[str] | None = None
        self._exiting = False
        self._open_engines = len(self._specs)

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the child (once). Spawn, not fork: this process already runs gRPC's threads."""
        if self._process is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._failure = self._loop.create_future()
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe(duplex=True)
        self._process = context.Process(
            target=_child_main,
            args=(child_end, self._specs, self._options, logging_settings()),
            name="chatfleet-engine",
            daemon=True,  # also ended by multiprocessing's exit hook if this process ends
        )
        self._process.start()
        child_end.close()  # the child holds its end; ours must close for EOF to reach us
        self._conn = parent_end
        logger.info(
            "engine process %d started (%d torch threads)", self._process.pid, self._threads
        )
        threading.Thread(
            target=self._read, args=(parent_end,), name="engine-process-reader", daemon=True
        ).start()

    @property
    def _threads(self) -> int:
        return self._options.threads or usable_cores()

    async def release(self) -> None:
        """One engine is done with the child; the last one asks it to exit and waits."""
        self._open_engines -= 1
        if self._open_engines > 0 or self._process is None or self._exiting:
            return
        self._exiting = True
        process = self._process
        with contextlib.suppress(OSError):
            self._send(("exit", 0, 0, None, None))
        await asyncio.to_thread(process.join, _EXIT_TIMEOUT_S)
        if process.exitcode is None:
            logger.warning("engine process %d did not exit; killing it", process.pid)
            process.kill()
            await asyncio.to_thread(process.join)
        if self._conn is not None:
            self._conn.close()

    async def failure(self) -> str:
        """Returns (why) once the child has died while the worker still needed it."""
        if self._failure is None:
            await asyncio.get_running_loop().create_future()  # never started: never fails
        assert self._failure is not None
        return await asyncio.shield(self._failure)

    def stats(self, engine: int) -> EngineStats | None:
        return self._stats[engine]

    # -- calls ------------------------------------------------------------------------------

    async def call(self, op: str, engine: int, payload: Any = None) -> Any:
        """A unary call (start, stop, tokenize, embed, drain) on one engine in the child."""
        assert self._loop is not None
        call_id = next(self._ids)
        call = _Call(engine, future=self._loop.create_future())
        self._submit(call_id, call, op, payload)
        return await call.future  # type: ignore[misc]

    async def stream(
        self, engine: int, request: GenerationRequest
    ) -> AsyncIterator[GenerationChunk]:
        """Generate in the child; closing this iterator early cancels the request there."""
        assert self._loop is not None
        call_id = next(self._ids)
        queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._submit(call_id, _Call(engine, queue=queue), "generate", request)
        ended = False
        try:
            while True:
                kind, payload = await queue.get()
                if kind == _CHUNK:
                    yield payload
                    continue
                ended = True
                if kind == _ERROR:
                    raise payload
                return  # _END
        finally:
            if not ended:
                # The call stays registered (and counted in the load) until the child confirms
                # that the request has left its engine.
                with contextlib.suppress(OSError):
                    self._send(("cancel", call_id, engine, None, None))

    def active_generations(self, engine: int) -> int:
        return sum(1 for c in self._calls.values() if c.engine == engine and c.queue is not None)

    async def settled(self, engine: int) -> None:
        """Return once no generation of `engine` is in flight: each has sent its last chunk,
        or the child has confirmed its cancellation (or the child is gone)."""
        assert self._loop is not None
        while self.active_generations(engine):
            waiter = self._loop.create_future()
            self._settle_waiters.append(waiter)
            await waiter

    def _generation_ended(self) -> None:
        waiters, self._settle_waiters = self._settle_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _submit(self, call_id: int, call: _Call, op: str, payload: Any) -> None:
        if self._failure is not None and self._failure.done():
            raise UnavailableError(f"the engine process has failed: {self._failure.result()}")
        if self._exiting or self._conn is None:
            raise UnavailableError("the engine process has stopped")
        self._calls[call_id] = call
        try:
            self._send((op, call_id, call.engine, payload, current_request_id()))
        except OSError as exc:
            del self._calls[call_id]
            raise UnavailableError(f"the engine process is gone: {exc}") from exc

    def _send(self, message: tuple[Any, ...]) -> None:
        conn = self._conn
        if conn is None:
            raise OSError("not connected")
        with self._send_lock:
            conn.send(message)

    # -- reader thread and event loop dispatch ----------------------------------------------

    def _read(self, conn: multiprocessing.connection.Connection) -> None:
        loop = self._loop
        assert loop is not None
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            try:
                loop.call_soon_threadsafe(self._dispatch, message)
            except RuntimeError:
                return  # the loop is closed: the worker is gone
        process = self._process
        if process is not None and not self._exiting:
            process.join(_REAP_TIMEOUT_S)  # the pipe closes just before the process ends
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._on_child_gone)

    def _dispatch(self, message: tuple[list[_Item], list[EngineStats | None]]) -> None:
        items, stats = message
        self._stats = stats
        for call_id, kind, payload in items:
            call = self._calls.get(call_id)
            if call is None:
                continue
            if call.queue is not None:
                call.queue.put_nowait((kind, payload))
                if kind != _CHUNK:
                    del self._calls[call_id]
                    self._generation_ended()
                continue
            del self._calls[call_id]
            assert call.future is not None
            if call.future.done():
                continue  # its caller was cancelled
            if kind == _ERROR:
                call.future.set_exception(payload)
            else:
                call.future.set_result(payload)

    def _on_child_gone(self) -> None:
        process = self._process
        code = process.exitcode if process is not None else None
        why = f"the engine process exited (exit code {code})"
        if not self._exiting:
            logger.error("%s; failing %d calls in flight", why, len(self._calls))
        error = UnavailableError("the model's engine process has stopped" if self._exiting else why)
        calls, self._calls = self._calls, {}
        for call in calls.values():
            if call.queue is not None:
                call.queue.put_nowait((_ERROR, error))
            elif call.future is not None and not call.future.done():
                call.future.set_exception(error)
        self._generation_ended()
        self._exiting = True
        if self._failure is not None and not self._failure.done() and self._open_engines > 0:
            self._failure.set_result(why)


class ProcessEngine(Engine):
    """One model, served by its replicas in one or more EngineProcesses, behind the Engine
    interface the servicer uses. A generation goes to the replica with the fewest in flight."""

    def __init__(
        self,
        processes: Sequence[EngineProcess],
        index: int,
        description: ModelDescription,
        max_running: int,
    ) -> None:
        self._processes = tuple(processes)
        self._index = index
        self._description = description
        self._max_running = max_running  # per replica
        self._turn = itertools.count()
        self._started = False
        self._released = False

    @property
    def description(self) -> ModelDescription:
        return self._description

    @property
    def replicas(self) -> int:
        return len(self._processes)

    async def start(self) -> None:
        for process in self._processes:
            process.start()
        # The replicas load at the same time, each on its own cores.
        descriptions = await asyncio.gather(
            *(process.call("start", self._index) for process in self._processes)
        )
        self._description = descriptions[0]
        self._started = True

    async def drain(self) -> None:
        if self._started:
            await asyncio.gather(*(p.call("drain", self._index) for p in self._processes))
            # The children are idle; wait for their last chunks and cancellation confirmations,
            # so that the load reads 0 and stop() cuts off nothing in transit.
            await asyncio.gather(*(p.settled(self._index) for p in self._processes))

    async def stop(self) -> None:
        if self._released:
            return
        self._released = True
        if self._started:
            await asyncio.gather(*(_stop_quietly(p, self._index) for p in self._processes))
        await asyncio.gather(*(process.release() for process in self._processes))

    async def failure(self) -> str:
        watches = [asyncio.ensure_future(p.failure()) for p in self._processes]
        try:
            done, _ = await asyncio.wait(watches, return_when=asyncio.FIRST_COMPLETED)
            return done.pop().result()
        finally:
            for watch in watches:
                watch.cancel()

    def load(self) -> LoadInfo:
        # Counted here, not taken from the children's reports: a report is sent only when a
        # child has something to say, so it would go stale when the engine falls idle.
        running = waiting = 0
        for process in self._processes:
            active = process.active_generations(self._index)
            running += min(active, self._max_running)
            waiting += max(0, active - self._max_running)
        return LoadInfo(
            running=running, waiting=waiting, capacity=self._max_running * self.replicas
        )

    def stats(self) -> EngineStats:
        load = self.load()
        reports = [p.stats(self._index) for p in self._processes]
        known = [r for r in reports if r is not None]
        if not known:
            return EngineStats(running=load.running, waiting=load.waiting)
        usages = [r.kv_cache_usage for r in known if r.kv_cache_usage is not None]
        usage = sum(usages) / len(usages) if usages else None
        if usage is not None and load.running == 0 and load.waiting == 0:
            usage = 0.0  # sequences free their cache when they retire: nothing holds any
        return EngineStats(
            running=load.running,
            waiting=load.waiting,
            kv_cache_usage=usage,
            prompt_tokens=sum(r.prompt_tokens for r in known),
            generation_tokens=sum(r.generation_tokens for r in known),
            preemptions=sum(r.preemptions for r in known),
            structured_mask_seconds=sum(r.structured_mask_seconds for r in known),
            step_seconds=sum(r.step_seconds for r in known),
            prefix_cache_queried_tokens=sum(r.prefix_cache_queried_tokens for r in known),
            prefix_cache_hit_tokens=sum(r.prefix_cache_hit_tokens for r in known),
        )

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        return self._pick(prefix_key(request.prompt)).stream(self._index, request)

    async def tokenize(self, prompt: str | ChatPrompt) -> list[int]:
        result: list[int] = await self._pick().call("tokenize", self._index, prompt)
        return result

    async def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        result: tuple[list[list[float]], int] = await self._pick().call(
            "embed", self._index, list(texts)
        )
        return result

    def _pick(self, key: int | None = None) -> EngineProcess:
        """The replica with the fewest generations in flight; ties go round in turn. With a
        prefix `key`, the replica the key maps to while it is at most AFFINITY_SLACK generations
        busier than the least busy one: each replica has its own prefix cache, so the turns of a
        conversation should keep meeting the replica that holds its history."""
        turn = next(self._turn)
        count = len(self._processes)
        order = [self._processes[(turn + i) % count] for i in range(count)]
        least = min(order, key=lambda p: p.active_generations(self._index))
        if key is None or count == 1:
            return least
        preferred = self._processes[key % count]
        slack = preferred.active_generations(self._index) - least.active_generations(self._index)
        return preferred if slack <= AFFINITY_SLACK else least


# How many more generations in flight the replica holding a prompt's prefix may have than the
# least busy one before the prompt goes elsewhere (and is prefilled from scratch there).
AFFINITY_SLACK = 1
# What identifies a prompt's prefix for routing: the first messages of a conversation (the system
# prompt and the first question stay while the history grows), the start of a text or of token ids.
_PREFIX_MESSAGES, _PREFIX_CHARS, _PREFIX_IDS = 2, 256, 64


def prefix_key(prompt: Prompt) -> int | None:
    """A stable key of the prompt's beginning, for routing it to the replica that has probably
    cached it; None when the prompt has nothing to key on."""
    if isinstance(prompt, str):
        head = prompt[:_PREFIX_CHARS]
    elif isinstance(prompt, Conversation) or (prompt and isinstance(prompt[0], ChatMessage)):
        messages = prompt.messages if isinstance(prompt, Conversation) else prompt
        head = "\x1e".join(
            f"{m.role}\x1f{m.content}"
            for m in list(messages)[:_PREFIX_MESSAGES]
            if isinstance(m, ChatMessage)
        )
    else:
        head = ",".join(str(t) for t in list(prompt)[:_PREFIX_IDS])
    return zlib.crc32(head.encode("utf-8", "surrogatepass")) if head else None


async def _stop_quietly(process: EngineProcess, index: int) -> None:
    with contextlib.suppress(UnavailableError):
        await process.call("stop", index)


def create_process_engines(
    specs: Sequence[ModelSpec], options: EngineOptions, replicas: int | None = 1
) -> list[ProcessEngine]:
    """Engines for `specs`, run by `replicas` child processes (None: `auto_replicas`) that each
    load every model and share the usable cores (unless --threads says otherwise), each with its
    share of the batch size, queue and KV cache budget. Paths are checked here, before anything
    is spawned."""
    if replicas is None:
        replicas = auto_replicas(specs, options)
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    share = replace(
        options,
        threads=options.threads or max(1, usable_cores() // replicas),
        max_running=_ceil_div(options.max_running, replicas),
        max_waiting=_ceil_div(options.max_waiting, replicas),
        kv_cache_tokens=_ceil_div(options.kv_cache_tokens, replicas),
    )
    descriptions = [_planned_description(spec, share) for spec in specs]
    processes = [EngineProcess(specs, share) for _ in range(replicas)]
    return [ProcessEngine(processes, i, d, share.max_running) for i, d in enumerate(descriptions)]


# Auto replication stops where the replicas' weights would take more than this share of memory.
_REPLICA_MEMORY_SHARE = 0.25
# In-memory bytes of the weights per byte on disk: GGUF is dequantized (4-bit -> fp32 is 8x;
# counted as 4x, as files mix quantized and full tensors), other formats load fp16 -> fp32.
_GGUF_EXPANSION, _OTHER_EXPANSION = 4, 2
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def auto_replicas(specs: Sequence[ModelSpec], options: EngineOptions) -> int:
    """On a CPU, one engine process per usable core, each with one torch thread: an engine with
    several threads stalls at every OpenMP barrier whenever the serving processes (gRPC, the
    gateway, clients) take one of its cores for a moment, while single-threaded replicas just
    run a little slower (bench/README.md: 261 tok/s against 176 on 16 streams, 2 cores). Capped
    so the replicas' weights stay under a quarter of the machine's memory: large models get one
    process. On a GPU one process: the device is the engine, and replicas would split its memory.
    An explicit --threads also means one process with that many threads."""
    from services.worker.loading import resolve_device

    cores = usable_cores()
    if options.threads is not None or cores == 1 or resolve_device(options.device).type != "cpu":
        return 1
    weights = sum(_estimated_weight_bytes(spec) for spec in specs)
    memory = _physical_memory()
    if not weights or not memory:
        return 1
    fits = int(memory * _REPLICA_MEMORY_SHARE // weights)
    return max(1, min(cores, fits))


def _estimated_weight_bytes(spec: ModelSpec) -> int:
    from services.worker.loading import resolve_source

    source = resolve_source(spec.path)
    if source.gguf_file:
        return (source.directory / source.gguf_file).stat().st_size * _GGUF_EXPANSION
    files = [p for p in source.directory.iterdir() if p.suffix in _WEIGHT_SUFFIXES]
    return sum(p.stat().st_size for p in files) * _OTHER_EXPANSION


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _planned_description(spec: ModelSpec, options: EngineOptions) -> ModelDescription:
    """What the model is known to be before it is loaded (the child reports the rest)."""
    from services.worker.loading import ModelKind

    plan = plan_load(spec, options)
    causal = plan.kind is ModelKind.CAUSAL_LM
    return ModelDescription(
        name=plan.names[0],
        aliases=plan.names[1:],
        context_length=plan.context_length or 0,
        supports_generate=causal,
        supports_chat=causal,
        supports_embeddings=True,
        source=plan.source.display,
    )


# -- the child process ----------------------------------------------------------------------


def _child_main(
    conn: multiprocessing.connection.Connection,
    specs: Sequence[ModelSpec],
    options: EngineOptions,
    log_settings: tuple[str, str],
) -> None:
    # The worker decides when to stop: a Ctrl-C or a SIGTERM to the process group must not
    # kill the engines under requests the worker is still draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(*log_settings)
    # tqdm (GGUF conversion progress) would make a multiprocessing lock, which the resource
    # tracker reports as leaked when this process ends: a thread lock does for one process.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    from services.worker.loading import create_engine

    engines = [create_engine(spec, options) for spec in specs]
    host = _EngineHost(conn, engines)
    orphaned = asyncio.run(host.run())
    logging.shutdown()
    # Without a worker to report to, nothing is left to wait for (tokenizer threads included).
    os._exit(0 if not orphaned else 1)


class _EngineHost:
    """The child's side: runs the calls it reads from the pipe on its engines, and sends back
    what they produce, batched per event-loop turn."""

    def __init__(self, conn: multiprocessing.connection.Connection, engines: list[Engine]) -> None:
        self._conn = conn
        self._engines = engines
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._outbox: list[_Item] = []
        self._flush_scheduled = False
        self._started: set[int] = set()

    async def run(self) -> bool:
        """Serve until asked to exit (False) or until the worker goes away (True)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()

        def on_message(message: tuple[Any, ...] | None) -> None:
            if message is None:
                if not done.done():
                    done.set_result(True)
                return
            op, call_id, engine, payload, request_id = message
            if op == "exit":
                if not done.done():
                    done.set_result(False)
            elif op == "cancel":
                task = self._tasks.get(call_id)
                if task is not None:
                    task.cancel()
            else:
                with bound_request_id(request_id):
                    self._tasks[call_id] = loop.create_task(self._run(op, call_id, engine, payload))

        def read() -> None:
            while True:
                try:
                    message = self._conn.recv()
                except (EOFError, OSError):
                    message = None
                try:
                    loop.call_soon_threadsafe(on_message, message)
                except RuntimeError:
                    return
                if message is None or message[0] == "exit":
                    return

        threading.Thread(target=read, name="engine-host-reader", daemon=True).start()
        orphaned = await done
        if not orphaned:
            for index in sorted(self._started):
                await self._engines[index].stop()
            self._flush()
        return orphaned

    async def _run(self, op: str, call_id: int, index: int, payload: Any) -> None:
        engine = self._engines[index]
        try:
            kind: str = _VALUE
            value: Any = None
            if op == "generate":
                async for chunk in engine.generate(payload):
                    self._emit(call_id, _CHUNK, chunk)
                kind = _END
            elif op == "start":
                await engine.start()
                self._started.add(index)
                value = engine.description
            elif op == "stop":
                self._started.discard(index)
                await engine.stop()
            elif op == "drain":
                await engine.drain()
            elif op == "tokenize":
                value = await engine.tokenize(payload)
            elif op == "embed":
                value = await engine.embed(payload)
            else:
                raise ValueError(f"unknown engine call {op!r}")
            self._emit(call_id, kind, value)
        except asyncio.CancelledError:
            # Only generations are cancelled; the engine has dropped the request, so its slot
            # is free by the time the worker reads this.
            self._emit(call_id, _END, None)
        except Exception as exc:  # every error goes back to the caller, in a form it can load
            self._emit(call_id, _ERROR, _portable(exc))
        finally:
            self._tasks.pop(call_id, None)

    def _emit(self, call_id: int, kind: str, payload: Any) -> None:
        self._outbox.append((call_id, kind, payload))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._outbox:
            return
        items, self._outbox = self._outbox, []
        stats = [
            engine.stats() if i in self._started else None for i, engine in enumerate(self._engines)
        ]
        with contextlib.suppress(OSError):  # the worker is gone; run() ends on EOF
            self._conn.send((items, stats))


def _portable(exc: Exception) -> Exception:
    """`exc` if it survives pickling (chatfleet's errors, ValueError...), else a RuntimeError
    naming it; the traceback stays in this process's log."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        logger.exception("engine call failed")
        return RuntimeError(f"{type(exc).__name__}: {exc}")
