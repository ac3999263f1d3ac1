"""The engine's scheduler: the bounded admission queue, the running set (preemption under KV cache
pressure included) and the engine's lifecycle state, shared by the event loop (submit, cancel,
drain) and the engine thread (next_work, retire)."""

from __future__ import annotations

import concurrent.futures
import enum
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from services.common.errors import OverloadedError, UnavailableError
from services.worker.engine.interface import LoadInfo
from services.worker.engine.sequence import SequenceState

T = TypeVar("T")


class EngineState(enum.Enum):
    NEW = "new"
    STARTING = "starting"  # loading and warming up: only internal requests
    READY = "ready"
    DRAINING = "draining"  # finishing admitted work, refusing new work
    STOPPING = "stopping"
    STOPPED = "stopped"


class EngineJob:
    """A callable to run on the engine thread between steps (embedding forwards)."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return  # the caller went away
        try:
            self.future.set_result(self.fn())
        except Exception as exc:  # handed to the awaiting caller, which re-raises it
            self.future.set_exception(exc)


@dataclass
class Work:
    """What one engine-thread iteration does."""

    running: list[SequenceState]  # in admission order
    retired: list[SequenceState]  # left since the last step: their cache is to be freed
    jobs: list[EngineJob]


class Scheduler:
    """Admission queue, running set and engine state, shared by the event loop (submit, cancel,
    load) and the engine thread (next_work, retire). One Condition guards all of it; the engine
    thread sleeps on it when idle."""

    def __init__(self, max_running: int, max_waiting: int) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._waiting: deque[SequenceState] = deque()
        self._running: list[SequenceState] = []
        self._retired: list[SequenceState] = []
        self._jobs: list[EngineJob] = []
        self._drained: list[Callable[[], None]] = []
        self.state = EngineState.NEW

    # -- event loop side --------------------------------------------------------------------

    def check_accepting(self, *, internal: bool = False) -> None:
        state = self.state
        if state is EngineState.READY or (internal and state is EngineState.STARTING):
            return
        if state in (EngineState.NEW, EngineState.STARTING):
            raise UnavailableError("the model is still loading")
        raise UnavailableError("the model is shutting down")

    def check_capacity(self) -> None:
        with self._cond:
            self._check_capacity_locked()

    def submit(self, seq: SequenceState, *, internal: bool = False) -> None:
        with self._cond:
            self.check_accepting(internal=internal)
            self._check_capacity_locked()
            self._waiting.append(seq)
            self._cond.notify()

    def submit_job(
        self, fn: Callable[[], T], *, internal: bool = False
    ) -> concurrent.futures.Future[T]:
        job = EngineJob(fn)
        with self._cond:
            self.check_accepting(internal=internal)
            if len(self._jobs) >= max(self.max_waiting, 1):
                raise OverloadedError("too many embedding requests are queued; retry later")
            self._jobs.append(job)
            self._cond.notify()
        return job.future

    def cancel(self, seq: SequenceState) -> None:
        with self._cond:
            seq.cancelled = True
            try:
                self._waiting.remove(seq)  # never admitted: nothing to free
            except ValueError:
                pass  # running (the engine thread retires it) or already gone
            self._cond.notify()

    def has_work(self) -> bool:
        """Whether sequences run or wait (cancelled ones not counted)."""
        with self._cond:
            return bool(self._waiting) or any(not s.cancelled for s in self._running)

    def load(self) -> LoadInfo:
        with self._cond:
            running = sum(1 for s in self._running if not s.cancelled)
            return LoadInfo(running=running, waiting=len(self._waiting), capacity=self.max_running)

    def transition(self, expected: EngineState, state: EngineState) -> bool:
        with self._cond:
            if self.state is not expected:
                return False
            self.state = state
            return True

    def set_state(self, state: EngineState) -> EngineState:
        with self._cond:
            previous, self.state = self.state, state
            self._cond.notify_all()
            return previous

    def on_drained(self, callback: Callable[[], None]) -> None:
        """Stop admitting new work; call `callback` (from any thread) once nothing is in flight."""
        with self._cond:
            if self.state in (EngineState.READY, EngineState.STARTING):
                self.state = EngineState.DRAINING
            self._drained.append(callback)
            self._notify_drained_locked()
            self._cond.notify_all()

    # -- engine thread side -----------------------------------------------------------------

    def next_work(self) -> Work | None:
        """Block until there is something to do; None once the engine is stopping."""
        with self._cond:
            while True:
                if self.state is EngineState.STOPPING:
                    return None
                # Cancelled sequences leave here, before anything else runs: their cache is freed.
                for seq in [s for s in self._running if s.cancelled]:
                    self._retire_locked(seq)
                if self._waiting or self._running or self._jobs:
                    break
                self._notify_drained_locked()
                self._cond.wait()
            while self._waiting and len(self._running) < self.max_running:
                self._running.append(self._waiting.popleft())
            jobs, self._jobs = self._jobs, []
            retired, self._retired = self._retired, []
            return Work(list(self._running), retired, jobs)

    def retire(self, seq: SequenceState) -> None:
        with self._cond:
            self._retire_locked(seq)

    def preempt_to_fit(
        self, running: list[SequenceState], fits: Callable[[list[int]], bool]
    ) -> Iterator[SequenceState]:
        """Under KV cache pressure the newest sequences of `running` (in admission order) go back
        to the head of the queue, keeping their output, until the rest `fit`; each is yielded
        for the caller to free its cache before the next check. One always stays: a sequence
        fits the cache on its own (the context is capped to the budget)."""
        while len(running) > 1 and not fits([seq.length for seq in running]):
            victim = running.pop()
            victim.lose_cache()
            self.preempt(victim)
            yield victim

    def preempt(self, seq: SequenceState) -> None:
        """Send a running sequence back to the head of the queue (its cache was dropped)."""
        with self._cond:
            if seq in self._running:
                self._running.remove(seq)
                if not seq.cancelled:
                    self._waiting.appendleft(seq)

    def take_all(self) -> tuple[list[SequenceState], list[EngineJob]]:
        """Empty the engine (at stop): everything still waiting or running, and pending jobs."""
        with self._cond:
            seqs = [*self._running, *self._waiting]
            self._running.clear()
            self._waiting.clear()
            jobs, self._jobs = self._jobs, []
            self._notify_drained_locked()
            return seqs, jobs

    def _check_capacity_locked(self) -> None:
        # A request that finds a free slot is not "queued": the bound is on running + waiting.
        active = sum(1 for s in self._running if not s.cancelled)
        if active + len(self._waiting) >= self.max_running + self.max_waiting:
            raise OverloadedError(
                f"the model is busy: {active} running and {len(self._waiting)} waiting "
                f"(limit {self.max_waiting}); retry later"
            )

    def _retire_locked(self, seq: SequenceState) -> None:
        if seq in self._running:
            self._running.remove(seq)
            self._retired.append(seq)

    def _notify_drained_locked(self) -> None:
        if self._drained and not (self._waiting or self._running or self._jobs):
            callbacks, self._drained = self._drained, []
            for callback in callbacks:
                callback()
