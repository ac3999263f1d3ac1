"""The worker's side of one engine process: `EngineProcessClient` spawns the child, sends it
calls and routes its replies to the callers awaiting them.

A reader thread receives the child's reply batches and hands each to the event loop. When the
child dies, every call in flight fails with UnavailableError, new calls are refused, and
`failure()` completes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.common.errors import UnavailableError
from services.common.logs import logging_settings
from services.common.request_id import current_request_id
from services.worker.engine.interface import (
    ChatPrompt,
    EngineStats,
    GenerationChunk,
    GenerationRequest,
)
from services.worker.engine.loading import EngineOptions, ModelSpec, usable_cores
from services.worker.engine_process.host import run_child
from services.worker.engine_process.pipe import Call, Op, Reply, ReplyBatch, ReplyKind, Value

if TYPE_CHECKING:
    from services.worker.engine.cores import SharedCounter

logger = logging.getLogger(__name__)

# How long the child may take to exit after it was asked to, before it is killed.
_EXIT_TIMEOUT_S = 30.0
_REAP_TIMEOUT_S = 5.0


@dataclass
class _PendingCall:
    """A call in flight: a generation's queue of replies, or a unary call's future."""

    engine: int
    queue: asyncio.Queue[Reply] | None = None
    future: asyncio.Future[Value] | None = None


class EngineProcessClient:
    """One child process that runs every engine of a worker, and the calls in flight to it.

    Started by the first engine's start(); asked to exit once every engine has released it."""

    def __init__(
        self,
        specs: Sequence[ModelSpec],
        options: EngineOptions,
        busy_processes: SharedCounter | None = None,
    ) -> None:
        self._specs = tuple(specs)
        self._options = options
        self._busy_processes = busy_processes
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._send_lock = threading.Lock()
        self._calls: dict[int, _PendingCall] = {}
        self._ids = itertools.count(1)
        self._settle_waiters: list[asyncio.Future[None]] = []
        self._stats: Sequence[EngineStats | None] = [None] * len(self._specs)
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
            target=run_child,
            args=(
                child_end,
                self._specs,
                self._options,
                logging_settings(),
                self._busy_processes,
            ),
            name="chatfleet-engine",
            daemon=True,  # also ended by multiprocessing's exit hook if this process ends
        )
        self._process.start()
        child_end.close()  # the child holds its end; ours must close for EOF to reach us
        self._conn = parent_end
        logger.info(
            "engine process %d started (%d torch threads)",
            self._process.pid,
            self._options.threads or usable_cores(),
        )
        threading.Thread(
            target=self._read, args=(parent_end,), name="engine-process-reader", daemon=True
        ).start()

    async def release(self) -> None:
        """One engine is done with the child; the last one asks it to exit and waits."""
        self._open_engines -= 1
        if self._open_engines > 0 or self._process is None or self._exiting:
            return
        self._exiting = True
        process = self._process
        with contextlib.suppress(OSError):
            self._send(Call(Op.EXIT))
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
        """Engine `engine`'s counters as of the child's last reply batch."""
        return self._stats[engine]

    # -- calls ------------------------------------------------------------------------------

    async def call(
        self,
        op: Op,
        engine: int,
        *,
        prompt: str | ChatPrompt | None = None,
        texts: Sequence[str] = (),
    ) -> Value:
        """A unary call (START, STOP, DRAIN, TOKENIZE, EMBED) on one engine in the child."""
        assert self._loop is not None
        call = Call(op, next(self._ids), engine, current_request_id(), None, prompt, tuple(texts))
        pending = _PendingCall(engine, future=self._loop.create_future())
        self._submit(call, pending)
        assert pending.future is not None
        return await pending.future

    async def stream(
        self, engine: int, request: GenerationRequest
    ) -> AsyncIterator[GenerationChunk]:
        """Generate in the child; closing this iterator early cancels the request there."""
        assert self._loop is not None
        call_id = next(self._ids)
        queue: asyncio.Queue[Reply] = asyncio.Queue()
        call = Call(Op.GENERATE, call_id, engine, current_request_id(), request=request)
        self._submit(call, _PendingCall(engine, queue=queue))
        ended = False
        try:
            while True:
                reply = await queue.get()
                if reply.kind is ReplyKind.CHUNK:
                    assert isinstance(reply.payload, GenerationChunk)
                    yield reply.payload
                    continue
                ended = True
                if reply.kind is ReplyKind.ERROR:
                    assert isinstance(reply.payload, Exception)
                    raise reply.payload
                return  # END
        finally:
            if not ended:
                # The call stays registered (and counted in the load) until the child confirms
                # that the request has left its engine.
                with contextlib.suppress(OSError):
                    self._send(Call(Op.CANCEL, call_id, engine))

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

    def _submit(self, call: Call, pending: _PendingCall) -> None:
        if self._failure is not None and self._failure.done():
            raise UnavailableError(f"the engine process has failed: {self._failure.result()}")
        if self._exiting or self._conn is None:
            raise UnavailableError("the engine process has stopped")
        self._calls[call.call_id] = pending
        try:
            self._send(call)
        except OSError as exc:
            del self._calls[call.call_id]
            raise UnavailableError(f"the engine process is gone: {exc}") from exc

    def _send(self, call: Call) -> None:
        conn = self._conn
        if conn is None:
            raise OSError("not connected")
        with self._send_lock:
            conn.send(call)

    # -- reader thread and event loop dispatch ----------------------------------------------

    def _read(self, conn: multiprocessing.connection.Connection) -> None:
        loop = self._loop
        assert loop is not None
        while True:
            try:
                batch = conn.recv()
            except (EOFError, OSError):
                break
            try:
                loop.call_soon_threadsafe(self._dispatch, batch)
            except RuntimeError:
                return  # the loop is closed: the worker is gone
        process = self._process
        if process is not None and not self._exiting:
            process.join(_REAP_TIMEOUT_S)  # the pipe closes just before the process ends
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._on_child_gone)

    def _dispatch(self, batch: ReplyBatch) -> None:
        self._stats = batch.stats
        for reply in batch.replies:
            pending = self._calls.get(reply.call_id)
            if pending is None:
                continue
            if pending.queue is not None:
                pending.queue.put_nowait(reply)
                if reply.kind is not ReplyKind.CHUNK:
                    del self._calls[reply.call_id]
                    self._generation_ended()
                continue
            del self._calls[reply.call_id]
            future = pending.future
            assert future is not None
            if future.done():
                continue  # its caller was cancelled
            if reply.kind is ReplyKind.ERROR:
                assert isinstance(reply.payload, Exception)
                future.set_exception(reply.payload)
            else:
                assert not isinstance(reply.payload, (GenerationChunk, Exception))
                future.set_result(reply.payload)

    def _on_child_gone(self) -> None:
        process = self._process
        code = process.exitcode if process is not None else None
        why = f"the engine process exited (exit code {code})"
        if not self._exiting:
            logger.error("%s; failing %d calls in flight", why, len(self._calls))
        error = UnavailableError("the model's engine process has stopped" if self._exiting else why)
        calls, self._calls = self._calls, {}
        for call_id, pending in calls.items():
            if pending.queue is not None:
                pending.queue.put_nowait(Reply(call_id, ReplyKind.ERROR, error))
            elif pending.future is not None and not pending.future.done():
                pending.future.set_exception(error)
        self._generation_ended()
        self._exiting = True
        if self._failure is not None and not self._failure.done() and self._open_engines > 0:
            self._failure.set_result(why)
