"""`CoreShare`: the CPU cores a worker's engine processes share, given out by who has work.

Each replica process runs with its share of the cores (engine_process/sizing.py), which is what
keeps several busy replicas from stalling one another. A lone stream, though, keeps one replica
busy while the others idle with their cores: that replica then takes every core, and gives them
back at its next step once another replica has work. A shared counter of busy processes (a
multiprocessing.Value the worker hands every process at spawn) is all they need to agree.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch


class SharedCounter(Protocol):
    """What CoreShare needs of a multiprocessing.Value("i")."""

    value: int

    def get_lock(self) -> AbstractContextManager[Any]: ...


class CoreShare:
    """One engine process's view of the shared counter. Engines call `busy`/`idle` from their
    step threads and `apply` before each step, which sets that thread's torch threads."""

    def __init__(self, busy_processes: SharedCounter, own: int, every: int) -> None:
        if not 1 <= own <= every:
            raise ValueError(f"own cores must be between 1 and {every}, got {own}")
        self._busy_processes = busy_processes
        self._own = own
        self._every = every
        self._lock = threading.Lock()
        self._busy_engines: set[int] = set()

    def busy(self, engine: object) -> None:
        self._mark(engine, True)

    def idle(self, engine: object) -> None:
        self._mark(engine, False)

    def threads(self) -> int:
        """Every core while this process is the only one with work, else its own share."""
        return self._every if self._busy_processes.value <= 1 else self._own

    def apply(self, current: int) -> int:
        """Set the calling thread's torch threads to `threads()` if `current` differs (torch's
        count is per thread under OpenMP); returns the count now in force."""
        wanted = self.threads()
        if wanted != current:
            torch.set_num_threads(wanted)
        return wanted

    def _mark(self, engine: object, busy: bool) -> None:
        key = id(engine)
        with self._lock:
            before = bool(self._busy_engines)
            if busy:
                self._busy_engines.add(key)
            else:
                self._busy_engines.discard(key)
            after = bool(self._busy_engines)
            if before == after:
                return
            with self._busy_processes.get_lock():
                self._busy_processes.value += 1 if after else -1
