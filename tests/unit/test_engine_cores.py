"""CoreShare (engine/cores.py): a replica process with the only work takes every core, and gives
them back once another has work; the engine marks itself busy for its steps and idle after."""

from __future__ import annotations

import multiprocessing
import random
import threading
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import torch

from services.worker.engine.cores import CoreShare
from services.worker.engine.factory import create_engine
from services.worker.engine.loading import EngineOptions, ModelSpec
from tests.unit.models import save_tiny_llama
from tests.unit.test_engine import collect, random_prompt, request


class RecordingCounter:
    """A shared counter that remembers every value it took."""

    def __init__(self, value: int = 0) -> None:
        self._value = value
        self.history: list[int] = []
        self._lock = threading.Lock()

    @property
    def value(self) -> int:
        return self._value

    @value.setter
    def value(self, value: int) -> None:
        self._value = value
        self.history.append(value)

    def get_lock(self) -> AbstractContextManager[Any]:
        return self._lock


def test_a_lone_busy_process_takes_every_core_until_another_has_work() -> None:
    counter = multiprocessing.get_context("spawn").Value("i", 0)
    first, second = CoreShare(counter, 1, 2), CoreShare(counter, 1, 2)
    chat, embeddings = object(), object()
    first.busy(chat)
    assert counter.value == 1 and first.threads() == 2
    first.busy(embeddings)  # a second busy engine of the same process is the same process
    assert counter.value == 1 and first.threads() == 2
    second.busy(object())
    assert counter.value == 2 and first.threads() == second.threads() == 1
    first.idle(chat)
    assert counter.value == 2  # its embedding engine still works
    first.idle(embeddings)
    first.idle(embeddings)  # idle twice changes nothing
    assert counter.value == 1 and second.threads() == 2


def test_apply_sets_the_calling_threads_torch_threads_when_they_change() -> None:
    counter = RecordingCounter(2)  # another process has work
    share = CoreShare(counter, 1, 2)
    before = torch.get_num_threads()
    try:
        assert share.apply(current=1) == 1
        counter.value = 1
        assert share.apply(current=1) == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_own_share_must_fit_the_cores() -> None:
    with pytest.raises(ValueError, match="between 1 and 2"):
        CoreShare(RecordingCounter(), 3, 2)


async def test_the_engine_is_busy_while_it_steps_and_idle_after(tmp_path: Path) -> None:
    counter = RecordingCounter()
    engine = create_engine(
        ModelSpec(str(save_tiny_llama(tmp_path)), ("tiny",)),
        EngineOptions(threads=1, quantization="none"),
        CoreShare(counter, 1, 2),
    )
    await engine.start()
    try:
        result = await collect(engine, request(random_prompt(random.Random(3), 9), max_tokens=6))
    finally:
        await engine.stop()
    assert len(result.token_ids) == 6
    # Warm-up and the request each made the process busy, then idle again.
    assert counter.history and counter.history[0] == 1 and counter.value == 0
    assert set(counter.history) == {0, 1}
