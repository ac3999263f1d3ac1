"""The gateway's stream plumbing: merging the Generate streams of one request's choices, and
cancelling every call of a request that ends early."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator

import pytest
from gateway_fakes import REPLY, chat_body, fake_fleet, gateway_client

from chatfleet.v1 import worker_pb2
from services.common.errors import OverloadedError
from services.gateway.http_helpers import merge_streams

WAIT_S = 10.0


class Stream:
    """An async generator standing in for one Generate call; `closed` is set once its `finally`
    has run, where the real one cancels its gRPC call."""

    def __init__(self, *items: int, error: Exception | None = None) -> None:
        self.closed = False
        self.iterator = self._run(items, error)

    async def _run(
        self, items: tuple[int, ...], error: Exception | None
    ) -> AsyncGenerator[int, None]:
        try:
            for item in items:
                yield item
            if error is not None:
                raise error
        finally:
            self.closed = True


async def test_closing_the_merge_closes_every_stream() -> None:
    # Both streams have an item ready at once: one read completes but is never consumed.
    streams = [Stream(1, 2, 3), Stream(10, 20, 30)]
    merged = merge_streams([s.iterator for s in streams])
    assert await anext(merged) == (0, 1)
    await merged.aclose()
    assert [s.closed for s in streams] == [True, True]


async def test_a_failing_stream_ends_the_merge_and_closes_the_others() -> None:
    streams = [Stream(error=ValueError("boom")), Stream(10, 20, 30)]
    merged = merge_streams([s.iterator for s in streams])
    with pytest.raises(ValueError, match="boom"):
        async for _ in merged:
            pass
    assert [s.closed for s in streams] == [True, True]


async def test_merge_interleaves_to_the_end() -> None:
    streams = [Stream(1, 2), Stream(10)]
    merged = merge_streams([s.iterator for s in streams])
    items = [item async for item in merged]
    assert sorted(items) == [(0, 1), (0, 2), (1, 10)]
    assert [s.closed for s in streams] == [True, True]


async def test_a_failing_choice_cancels_the_call_of_another_choice() -> None:
    sent = asyncio.Event()

    async def script(
        request: worker_pb2.GenerateRequest,
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        if request.request_id.endswith("-1"):
            yield worker_pb2.GenerateResponse(text=REPLY[0], token_ids=[1])
            sent.set()
            await asyncio.Event().wait()  # until cancelled
        await sent.wait()  # choice 0 fails once choice 1 has output
        raise OverloadedError("evicted")

    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        fleet.worker.script = script
        response = await client.post("/v1/chat/completions", json=chat_body(n=2))
        assert response.status_code == 429
        await asyncio.wait_for(fleet.worker.generate_cancelled.wait(), WAIT_S)
