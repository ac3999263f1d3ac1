"""Two workers behind the gateway: one killed mid-stream, one drained by SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import httpx
import pytest

from chatfleet.v1 import controller_pb2
from tests.chaos.fleet import Fleet, WorkerLoad
from tests.chaos.traffic import Outcome, chat

pytestmark = pytest.mark.integration

# "Never a hang": generous bounds that only a hang would exceed.
NO_HANG_S = 120.0
ERROR_WITHIN_S = 10.0


def _running(loads: list[WorkerLoad | None]) -> int:
    return sum(load.running for load in loads if load is not None)


async def _started_streams(
    client: httpx.AsyncClient, count: int, max_tokens: int
) -> list[asyncio.Task[Outcome]]:
    """`count` streams, returned once each has produced text."""
    started = [asyncio.Event() for _ in range(count)]
    tasks = [
        asyncio.create_task(
            chat(client, f"Tell story {i}.", max_tokens=max_tokens, stream=True, started=event)
        )
        for i, event in enumerate(started)
    ]
    await asyncio.wait_for(asyncio.gather(*(event.wait() for event in started)), NO_HANG_S)
    return tasks


class Progress:
    """Pieces of text received per stream, and a way to wait for more."""

    def __init__(self, streams: int) -> None:
        self.pieces = [0] * streams
        self._changed = asyncio.Event()

    def counter(self, index: int) -> Callable[[], None]:
        def on_piece() -> None:
            self.pieces[index] += 1
            self._changed.set()

        return on_piece

    async def at_least(self, targets: list[int]) -> None:
        while any(have < want for have, want in zip(self.pieces, targets, strict=True)):
            self._changed.clear()
            await self._changed.wait()


async def _time_to_state(fleet: Fleet, index: int, state: int, since: float) -> float:
    """Seconds from `since` until the controller reports worker `index` in `state`."""
    await fleet.wait_worker_state(fleet.worker_addresses[index], {state}, NO_HANG_S)
    return asyncio.get_running_loop().time() - since


async def test_worker_sigkill_mid_stream(fleet: Fleet, client: httpx.AsyncClient) -> None:
    loop = asyncio.get_running_loop()
    progress = Progress(4)
    streams = [
        asyncio.create_task(
            chat(
                client,
                f"Tell story {i}.",
                max_tokens=200,
                stream=True,
                on_piece=progress.counter(i),
            )
        )
        for i in range(4)
    ]
    plain = [
        asyncio.create_task(chat(client, f"Tell tale {i}.", max_tokens=200, stream=False))
        for i in range(2)
    ]
    loads = await fleet.wait_load(lambda loads: _running(loads) == 6, NO_HANG_S)
    # A few more decode steps for every stream: by then every running request, the plain ones
    # included, has produced tokens (a request without any would be retried, not failed).
    await asyncio.wait_for(progress.at_least([n + 3 for n in progress.pieces]), NO_HANG_S)
    victim = max(range(2), key=lambda i: _running(loads[i : i + 1]))
    on_victim = loads[victim]
    assert on_victim is not None and on_victim.running > 0

    killed_at = loop.time()
    fleet.kill_worker(victim)
    unreachable = asyncio.create_task(
        _time_to_state(fleet, victim, controller_pb2.WORKER_STATE_UNREACHABLE, killed_at)
    )
    # New requests right away: the controller may still pick the dead worker for a moment; the
    # gateway then tries the other one, and the client never knows.
    fresh = [
        asyncio.create_task(chat(client, "Say hi.", max_tokens=8, stream=stream))
        for stream in (False, True, False, True)
    ]
    stream_results = await asyncio.wait_for(asyncio.gather(*streams), NO_HANG_S)
    plain_results = await asyncio.wait_for(asyncio.gather(*plain), NO_HANG_S)
    fresh_results = await asyncio.wait_for(asyncio.gather(*fresh), NO_HANG_S)

    # Every stream either completed (the other worker) or got an error event then [DONE].
    assert {r.kind for r in stream_results} <= {"ok", "stream_error"}, stream_results
    # A non-streamed request on the dead worker gets 503.
    assert {r.kind for r in plain_results} <= {"ok", "http_503"}, plain_results
    failed = [r for r in stream_results if r.kind == "stream_error"]
    failed_plain = [r for r in plain_results if r.kind == "http_503"]
    assert len(failed) + len(failed_plain) == on_victim.running
    for result in failed:
        assert result.error is not None and result.error["code"] == "service_unavailable"
        assert result.error_at is not None
        print(f"stream error {result.error_at - killed_at:.3f} s after the SIGKILL")
        assert result.error_at - killed_at < ERROR_WITHIN_S
    for result in (*stream_results, *plain_results):
        if result.ok:
            assert result.finish_reason == "length"
    assert all(r.ok for r in fresh_results), fresh_results

    # The controller noticed through its health Watch and routes elsewhere.
    seconds = await unreachable
    print(f"the controller saw it UNREACHABLE {seconds:.3f} s after the SIGKILL")
    assert seconds < ERROR_WITHIN_S
    assert await fleet.wait_exit(victim, ERROR_WITHIN_S) == -signal.SIGKILL


async def test_worker_sigterm_drains_then_exits_zero(
    fleet: Fleet, client: httpx.AsyncClient
) -> None:
    streams = await _started_streams(client, 4, max_tokens=60)
    loads = await fleet.loads()
    victim = max(range(2), key=lambda i: _running(loads[i : i + 1]))
    address = fleet.worker_addresses[victim]

    fleet.worker(victim).signal(signal.SIGTERM)
    # It leaves the controller's registry at once (deregistered, or NOT_SERVING on the way).
    await fleet.wait_worker_state(address, {None, controller_pb2.WORKER_STATE_NOT_SERVING}, 30)
    # New work goes to the other worker, invisibly.
    fresh = await asyncio.wait_for(
        asyncio.gather(*(chat(client, "Say hi.", max_tokens=8, stream=s) for s in (False, True))),
        NO_HANG_S,
    )
    assert all(r.ok for r in fresh), fresh
    # The streams it was serving finish normally within the grace period.
    results = await asyncio.wait_for(asyncio.gather(*streams), NO_HANG_S)
    assert all(r.ok and r.finish_reason == "length" for r in results), results
    assert await fleet.wait_exit(victim, NO_HANG_S) == 0
    assert address not in await fleet.worker_states()
