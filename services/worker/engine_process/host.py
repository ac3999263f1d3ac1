"""The engine process's side: `run_child` is its entry point, and `EngineChildHost` runs the calls
it reads from the pipe on its engines, from its own event loop, sending back what they produce
batched per event-loop turn (one batch per engine step while decoding).

Heavy imports (the engines, torch) happen in `run_child`, after signals and logging are set up, so
the worker can import this module cheaply for the entry point's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing.connection
import os
import pickle
import signal
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from services.common.logs import configure_logging
from services.common.request_id import bound_request_id
from services.worker.engine.interface import Engine
from services.worker.engine.loading import EngineOptions, ModelSpec
from services.worker.engine_process.pipe import Call, Op, Reply, ReplyBatch, ReplyKind, Value

if TYPE_CHECKING:
    from services.worker.engine.cores import SharedCounter

logger = logging.getLogger(__name__)


def run_child(
    conn: multiprocessing.connection.Connection,
    specs: Sequence[ModelSpec],
    options: EngineOptions,
    log_settings: tuple[str, str],
    busy_processes: SharedCounter | None = None,
) -> None:
    """The engine process: build the engines, serve the worker's calls until it says exit or goes
    away, then leave without waiting for anything else (tokenizer threads included).
    `busy_processes`: the counter the worker's replica processes share their cores by (cores.py),
    None for a process that keeps its threads."""
    # The worker decides when to stop: a Ctrl-C or a SIGTERM to the process group must not
    # kill the engines under requests the worker is still draining.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(*log_settings)
    # tqdm (GGUF conversion progress) would make a multiprocessing lock, which the resource
    # tracker reports as leaked when this process ends: a thread lock does for one process.
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    from services.worker.engine.cores import CoreShare
    from services.worker.engine.factory import create_engine
    from services.worker.engine.loading import usable_cores

    cores = None
    if busy_processes is not None and options.threads is not None:
        cores = CoreShare(busy_processes, options.threads, max(options.threads, usable_cores()))
    engines = [create_engine(spec, options, cores) for spec in specs]
    host = EngineChildHost(conn, engines)
    orphaned = asyncio.run(host.run())
    logging.shutdown()
    os._exit(0 if not orphaned else 1)


class EngineChildHost:
    """Runs the worker's calls on this process's engines and sends back what they produce."""

    def __init__(self, conn: multiprocessing.connection.Connection, engines: list[Engine]) -> None:
        self._conn = conn
        self._engines = engines
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._outbox: list[Reply] = []
        self._flush_scheduled = False
        self._started: set[int] = set()
        self._done: asyncio.Future[bool] | None = None
        # The one dispatch table: EXIT and CANCEL act at once; the others run as a task per call.
        self._handlers: dict[Op, Callable[[Call], None]] = {
            Op.EXIT: self._exit,
            Op.CANCEL: self._cancel,
            Op.START: self._task(self._start),
            Op.STOP: self._task(self._stop),
            Op.DRAIN: self._task(self._drain),
            Op.TOKENIZE: self._task(self._tokenize),
            Op.EMBED: self._task(self._embed),
            Op.GENERATE: self._task(self._generate),
        }

    async def run(self) -> bool:
        """Serve until asked to exit (False) or until the worker goes away (True)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        self._done = done

        def on_message(call: Call | None) -> None:
            if call is None:  # end of file: the worker is gone
                if not done.done():
                    done.set_result(True)
                return
            self._handlers[call.op](call)

        def read() -> None:
            while True:
                try:
                    call: Call | None = self._conn.recv()
                except (EOFError, OSError):
                    call = None
                try:
                    loop.call_soon_threadsafe(on_message, call)
                except RuntimeError:
                    return
                if call is None or call.op is Op.EXIT:
                    return

        threading.Thread(target=read, name="engine-host-reader", daemon=True).start()
        orphaned = await done
        if not orphaned:
            for index in sorted(self._started):
                await self._engines[index].stop()
            self._flush()
        return orphaned

    # -- control ----------------------------------------------------------------------------

    def _exit(self, call: Call) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(False)

    def _cancel(self, call: Call) -> None:
        task = self._tasks.get(call.call_id)
        if task is not None:
            task.cancel()

    def _task(self, handler: Callable[[Call], Awaitable[Value]]) -> Callable[[Call], None]:
        """Run `handler` as a task per call, under the worker's request id."""

        def spawn(call: Call) -> None:
            with bound_request_id(call.request_id):
                task = asyncio.get_running_loop().create_task(self._run(call, handler))
            self._tasks[call.call_id] = task

        return spawn

    async def _run(self, call: Call, handler: Callable[[Call], Awaitable[Value]]) -> None:
        try:
            value = await handler(call)
            kind = ReplyKind.END if call.op is Op.GENERATE else ReplyKind.VALUE
            self._emit(Reply(call.call_id, kind, value))
        except asyncio.CancelledError:
            # Only generations are cancelled; the engine has dropped the request, so its slot
            # is free by the time the worker reads this.
            self._emit(Reply(call.call_id, ReplyKind.END))
        except Exception as exc:  # every error goes back to the caller, in a form it can load
            self._emit(Reply(call.call_id, ReplyKind.ERROR, _portable(exc)))
        finally:
            self._tasks.pop(call.call_id, None)

    # -- operations -------------------------------------------------------------------------

    async def _start(self, call: Call) -> Value:
        engine = self._engines[call.engine]
        await engine.start()
        self._started.add(call.engine)
        return engine.description

    async def _stop(self, call: Call) -> Value:
        self._started.discard(call.engine)
        await self._engines[call.engine].stop()
        return None

    async def _drain(self, call: Call) -> Value:
        await self._engines[call.engine].drain()
        return None

    async def _tokenize(self, call: Call) -> Value:
        assert call.prompt is not None
        return await self._engines[call.engine].tokenize(call.prompt)

    async def _embed(self, call: Call) -> Value:
        return await self._engines[call.engine].embed(call.texts)

    async def _generate(self, call: Call) -> Value:
        assert call.request is not None
        async for chunk in self._engines[call.engine].generate(call.request):
            self._emit(Reply(call.call_id, ReplyKind.CHUNK, chunk))
        return None

    # -- replies ----------------------------------------------------------------------------

    def _emit(self, reply: Reply) -> None:
        self._outbox.append(reply)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._outbox:
            return
        replies, self._outbox = self._outbox, []
        stats = [
            engine.stats() if i in self._started else None for i, engine in enumerate(self._engines)
        ]
        with contextlib.suppress(OSError):  # the worker is gone; run() ends on EOF
            self._conn.send(ReplyBatch(replies, stats))


def _portable(exc: Exception) -> Exception:
    """`exc` if it survives pickling (chatfleet's errors, ValueError...), else a RuntimeError
    naming it; the traceback stays in this process's log."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        logger.exception("engine call failed")
        return RuntimeError(f"{type(exc).__name__}: {exc}")
