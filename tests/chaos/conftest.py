"""The chaos suite's fleet: controller, two chat-only workers and a gateway as real processes,
started once per session; every test starts from a fleet whose workers all serve."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from tests.chaos.fleet import Fleet


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    running = Fleet.create(tmp_path_factory.mktemp("chaos-logs"))
    stopped: list[tuple[str, int | None]] = []
    try:
        asyncio.run(running.start())
        yield running
    except BaseException:
        running.dump_logs()
        raise
    finally:
        stopped = asyncio.run(running.stop())
    # Graceful shutdown: every process still running at the end stops on SIGTERM with code 0.
    assert stopped and all(code == 0 for _, code in stopped), stopped


@pytest.fixture(autouse=True)
async def healed(fleet: Fleet) -> Fleet:
    """Start again whatever an earlier test killed, and wait until every worker serves."""
    try:
        await fleet.heal()
    except BaseException:
        fleet.dump_logs()
        raise
    return fleet


@pytest.fixture
async def client(fleet: Fleet) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        base_url=fleet.gateway_url, headers=fleet.headers, timeout=180, limits=limits
    ) as http:
        yield http
