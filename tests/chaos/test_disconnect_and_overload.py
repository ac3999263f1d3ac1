"""A client hanging up frees the worker's slot; ten times the fleet's capacity in offered load gets
429 with Retry-After for the excess while every accepted request completes."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.chaos.fleet import Fleet, WorkerLoad
from tests.chaos.traffic import chat, chat_body

pytestmark = pytest.mark.integration

NO_HANG_S = 120.0
# Per worker: --max-batch-size 8 running plus --max-queue 2 waiting (tests/chaos/fleet.py).
WORKER_CAPACITY = 8 + 2
# What a burst may add to a process's memory: far more than it should, far less than unbounded
# queues would take.
RSS_GROWTH_LIMIT_MIB = 256


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _idle(loads: list[WorkerLoad | None]) -> bool:
    return all(load is not None and load.running == load.waiting == 0 for load in loads)


def _running(loads: list[WorkerLoad | None]) -> int:
    return sum(load.running for load in loads if load is not None)


async def test_client_disconnect_frees_the_worker_slot(
    fleet: Fleet, client: httpx.AsyncClient
) -> None:
    await fleet.wait_load(_idle, NO_HANG_S)
    body = chat_body("Tell a long story.", max_tokens=1000, stream=True)
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        # Held until the block ends: a dropped line iterator would be finalized (closing the
        # response) as soon as the loop breaks.
        lines = response.aiter_lines()
        async for line in lines:
            if '"content":"' in line and '"content":""' not in line:
                break  # the first piece of text: the request holds a batch slot
        assert _running(await fleet.loads()) == 1
    # Leaving the block hung up: the gateway cancels the call, the worker retires the request.
    await fleet.wait_load(_idle, 10)


async def test_ten_times_capacity_gets_429_and_accepted_requests_complete(
    fleet: Fleet, client: httpx.AsyncClient
) -> None:
    offered = 10 * WORKER_CAPACITY * len(fleet.workers)
    before = {name: _rss_mib(pid) for name, pid in fleet.pids().items()}
    results = await asyncio.wait_for(
        asyncio.gather(
            *(
                chat(client, f"Count to {i}.", max_tokens=16, stream=i % 2 == 0)
                for i in range(offered)
            )
        ),
        300,
    )
    kinds = Counter(result.kind for result in results)
    print(f"{offered} requests offered at once: {dict(kinds)}")
    assert set(kinds) <= {"ok", "http_429"}, kinds
    assert kinds["ok"] >= 1 and kinds["http_429"] >= 1, kinds
    for result in results:
        if result.kind == "http_429":
            assert result.retry_after is not None and int(result.retry_after) >= 1
            assert result.error is not None and result.error["type"] == "rate_limit_error"
        else:
            assert result.finish_reason == "length"
    # Nothing is left behind: the workers are idle and serve the next request, and no process
    # kept what the burst brought.
    await fleet.wait_load(_idle, 30)
    assert (await chat(client, "Say hi.", max_tokens=4, stream=False)).ok
    growth = {name: _rss_mib(pid) - before[name] for name, pid in fleet.pids().items()}
    print("RSS growth over the burst (MiB):", {k: round(v, 1) for k, v in growth.items()})
    assert all(mib < RSS_GROWTH_LIMIT_MIB for mib in growth.values()), growth
