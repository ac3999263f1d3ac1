"""The controller restarted (SIGTERM) or killed (SIGKILL): streams in flight go on, requests made
while it is away wait for it, the workers register again, and no request fails."""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest

from tests.chaos.fleet import Fleet
from tests.chaos.traffic import chat

pytestmark = pytest.mark.integration

NO_HANG_S = 120.0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_controller_restart_loses_no_request(
    fleet: Fleet, client: httpx.AsyncClient, sig: int
) -> None:
    assert (await chat(client, "Say hi.", max_tokens=4, stream=False)).ok
    started = asyncio.Event()
    across = asyncio.create_task(
        chat(client, "Tell a story.", max_tokens=60, stream=True, started=started)
    )
    await asyncio.wait_for(started.wait(), NO_HANG_S)

    controller = fleet.controller
    assert controller is not None
    controller.signal(sig)
    code = await controller.wait_exit(60)
    assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    # Made while no controller listens: they wait for the next one.
    during = [
        asyncio.create_task(chat(client, f"Say hi {i}.", max_tokens=8, stream=i % 2 == 1))
        for i in range(4)
    ]
    await fleet.start_controller()

    results = await asyncio.wait_for(asyncio.gather(across, *during), NO_HANG_S)
    assert all(r.ok for r in results), results
    await fleet.wait_workers_serving(60)
    after = await asyncio.wait_for(
        asyncio.gather(*(chat(client, "Say hi.", max_tokens=4, stream=s) for s in (False, True))),
        NO_HANG_S,
    )
    assert all(r.ok for r in after), after
