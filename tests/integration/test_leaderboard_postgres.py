"""The leaderboard shared by gateway replicas through a real PostgreSQL server (started here, in
a temporary folder): a battle started on one gateway is voted on through another, votes survive
a gateway restart, racing votes count once, and MT-bench scores show beside the ratings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.cli.launcher import ServiceProcess, free_port
from services.leaderboard.store import (
    Battle,
    BattleDecidedError,
    MTBenchScore,
    PostgresStore,
    Vote,
    open_store,
)
from tests.integration.conftest import CHAT_MODEL, HOST, READY_TIMEOUT_S, Stack, service_env
from tests.integration.postgres import PostgresMissing, PostgresServer

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    try:
        server = PostgresServer()
    except PostgresMissing as missing:
        pytest.skip(str(missing))
    try:
        server.start()
        yield server
    except BaseException:
        print(server.log[-4000:])
        raise
    finally:
        server.stop()


class Gateway:
    """A `chatfleet gateway` process on a free port, with its store at `url`."""

    def __init__(self, stack: Stack, url: str, log: Path) -> None:
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        args = [
            "--host", HOST, "--port", str(self.port),
            "--controller-address", stack.controller_address, "--leaderboard-url", url,
        ]  # fmt: skip
        self.process = ServiceProcess("gateway", args, service_env(), str(log))

    async def start(self) -> Gateway:
        self.process.start()
        await self.process.wait_http_ok(f"{self.base}/health", READY_TIMEOUT_S)
        return self

    async def restart(self) -> None:
        await self.process.stop()
        self.process = ServiceProcess(
            "gateway", self.process.args, self.process.env, self.process.log_path
        )
        await self.start()


def tail_logs(folder: Path) -> str:
    return "\n".join(
        f"==== {log.name}\n{log.read_text()[-3000:]}" for log in sorted(folder.glob("*.log"))
    )


async def answer(client: httpx.AsyncClient, gateway: Gateway, battle_id: str, side: str) -> None:
    response = await client.post(
        f"{gateway.base}/api/arena/battles/{battle_id}/completions",
        json={"side": side, "messages": MESSAGES, "max_tokens": 4, "temperature": 0},
    )
    assert response.status_code == 200, response.text
    assert CHAT_MODEL not in response.text  # still anonymous


async def board(client: httpx.AsyncClient, gateway: Gateway) -> dict[str, Any]:
    response = await client.get(f"{gateway.base}/api/v1/leaderboard")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_two_gateways_share_battles_votes_and_scores(
    stack: Stack, postgres: PostgresServer, tmp_path: Path
) -> None:
    first, second = (
        Gateway(stack, postgres.dsn, tmp_path / "a.log"),
        Gateway(stack, postgres.dsn, tmp_path / "b.log"),
    )
    try:
        await asyncio.gather(first.start(), second.start())
        async with httpx.AsyncClient(timeout=120) as client:
            started = await client.post(f"{first.base}/api/arena/battles")
            assert started.status_code == 201, started.text
            battle = started.json()
            assert CHAT_MODEL not in started.text
            await answer(client, first, battle["id"], "a")
            await answer(client, second, battle["id"], "b")
            voted = await client.post(
                f"{second.base}/api/arena/votes", json={"battle_id": battle["id"], "winner": "a"}
            )
            assert voted.status_code == 200, voted.text
            assert voted.json()["model_a"] == CHAT_MODEL  # revealed only now
            again = await client.post(
                f"{first.base}/api/arena/votes", json={"battle_id": battle["id"], "winner": "b"}
            )
            assert again.status_code == 400
            assert again.json()["error"]["code"] == "battle_decided"

            boards = [await board(client, g) for g in (first, second)]
            assert boards[0] == boards[1]
            assert boards[0]["total_votes"] == 1
            [entry] = boards[0]["data"]
            assert (entry["model"], entry["votes"], entry["rating"]) == (CHAT_MODEL, 1, 1000.0)

            await first.restart()
            after = await board(client, first)
            assert after["total_votes"] == 1
            assert after["data"] == boards[0]["data"]

            # What `chatfleet eval mt-bench --leaderboard-url` does at the end.
            async with await open_store(postgres.dsn) as store:
                await store.record_mtbench([MTBenchScore(CHAT_MODEL, "judge-x", 2.75, 2, 1)])
            for gateway in (first, second):
                [entry] = (await board(client, gateway))["data"]
                assert (entry["mt_bench"], entry["mt_bench_judge"]) == (2.75, "judge-x")
    except BaseException:
        print(tail_logs(tmp_path))
        raise
    finally:
        await asyncio.gather(first.process.stop(), second.process.stop())


async def test_racing_votes_from_two_stores_count_once(postgres: PostgresServer) -> None:
    # Opened together: two gateways starting at once both create the tables without a clash.
    stores = await asyncio.gather(open_store(postgres.dsn), open_store(postgres.dsn))
    try:
        assert all(isinstance(store, PostgresStore) for store in stores)
        battle = Battle(f"race-{time.time_ns()}", "x", "y", time.time())
        await stores[0].create_battle(battle)
        await stores[1].mark_asked(battle.id, "a")
        await stores[0].mark_asked(battle.id, "b")
        results = await asyncio.gather(
            *(s.record_vote(battle.id, w) for s in stores for w in ("a", "b", "tie")),
            return_exceptions=True,
        )
        won = [r for r in results if isinstance(r, Vote)]
        assert len(won) == 1
        assert all(isinstance(r, BattleDecidedError) for r in results if r not in won)
        assert [v for v in await stores[1].votes() if v.battle_id == battle.id] == won
    finally:
        for store in stores:
            await store.close()


async def test_a_gateway_whose_database_is_unreachable_says_so(tmp_path: Path) -> None:
    dead = f"postgresql://chatfleet:hunter2@{HOST}:{free_port()}/chatfleet"
    log = tmp_path / "gateway.log"
    process = ServiceProcess(
        "gateway",
        ["--host", HOST, "--port", "0", "--leaderboard-url", dead],
        service_env(),
        str(log),
    )
    process.start()
    try:
        assert await process.wait_exit(READY_TIMEOUT_S) != 0
    finally:
        await process.stop()
    text = log.read_text()
    assert "cannot connect to the PostgreSQL database postgresql://chatfleet:***@" in text
    assert "hunter2" not in text
