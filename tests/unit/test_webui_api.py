"""The web UI's routes against fake gRPC servers: the open page and assets, the API key on the
arena API, anonymous battles, votes, the leaderboard, input errors and cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from gateway_fakes import (
    CHAT_MODEL,
    EMBED_MODEL,
    REPLY,
    Fleet,
    failing_script,
    fake_fleet,
    gateway_client,
    gateway_server,
    hanging_script,
    sse_events,
)

from chatfleet.v1 import common_pb2
from services.common.errors import InvalidRequestError
from services.gateway.webui import PUBLIC_PATHS, STATIC_DIR
from services.gateway.webui.routes import chat_models
from services.leaderboard.store import MTBenchScore, open_store

KEY = "sk-webui-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
WAIT_S = 10.0
MESSAGES = [{"role": "user", "content": "Which is better?"}]


@asynccontextmanager
async def arena(tmp_path: Path, **config: Any) -> AsyncIterator[tuple[Fleet, httpx.AsyncClient]]:
    """A fake fleet behind an in-process gateway that requires KEY; the client sends it."""
    db = str(tmp_path / "arena.sqlite3")
    async with (
        fake_fleet(api_keys=(KEY,), arena_db=db, **config) as fleet,
        gateway_client(fleet.config, headers=AUTH) as client,
    ):
        yield fleet, client


async def answer(client: httpx.AsyncClient, battle_id: str, side: str) -> httpx.Response:
    return await client.post(
        f"/api/arena/battles/{battle_id}/completions",
        json={"side": side, "messages": MESSAGES, "temperature": 0.5, "max_tokens": 8},
    )


def error_of(response: httpx.Response) -> dict[str, Any]:
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


# --- the page --------------------------------------------------------------------------------


async def test_page_and_assets_are_open_while_the_api_needs_a_key(tmp_path: Path) -> None:
    async with arena(tmp_path) as (fleet, _), gateway_client(fleet.config) as anonymous:
        page = await anonymous.get("/")
        assets = {path: await anonymous.get(path) for path in PUBLIC_PATHS - {"/"}}
        models = await anonymous.get("/v1/models")
        battles = await anonymous.post("/api/arena/battles")
        board = await anonymous.get("/api/arena/leaderboard")
        v1_board = await anonymous.get("/api/v1/leaderboard")
        licence = await anonymous.get("/ui/vendor/LICENSE.marked")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "<title>chatfleet</title>" in page.text
    for path, response in assets.items():
        assert response.status_code == 200, path
        assert response.headers["content-type"].split(";")[0] in {
            "text/css",
            "text/javascript",
            "application/javascript",
        }
    for refused in (models, battles, board, v1_board, licence):
        assert refused.status_code == 401
        assert error_of(refused)["code"] == "invalid_api_key"


def test_every_asset_the_page_loads_is_public() -> None:
    served = {
        "/ui/" + str(path.relative_to(STATIC_DIR))
        for path in STATIC_DIR.rglob("*")
        if path.suffix in {".js", ".css"}
    }
    assert served == PUBLIC_PATHS - {"/"}
    page = (STATIC_DIR / "index.html").read_text()
    for path in served:
        assert f'"{path}"' in page


async def test_ui_models_say_which_models_chat(tmp_path: Path) -> None:
    async with arena(tmp_path) as (_, client):
        response = await client.get("/api/models")
    assert response.status_code == 200
    # The fakes declare no capability: both are offered.
    assert [(m["id"], m["supports_chat"]) for m in response.json()["data"]] == [
        (CHAT_MODEL, True),
        (EMBED_MODEL, True),
    ]


def test_chat_models_leave_out_embedding_only_models() -> None:
    infos = [
        common_pb2.ModelInfo(
            name="llm", kind=common_pb2.MODEL_KIND_GENERATE, supports_chat=True, aliases=["x"]
        ),
        common_pb2.ModelInfo(
            name="encoder", kind=common_pb2.MODEL_KIND_EMBED, supports_embeddings=True
        ),
        common_pb2.ModelInfo(name="base", kind=common_pb2.MODEL_KIND_GENERATE),
        common_pb2.ModelInfo(name="unknown"),
    ]
    assert chat_models(infos) == ["llm", "unknown"]


# --- a battle --------------------------------------------------------------------------------


async def test_a_battle_hides_the_models_until_the_vote(tmp_path: Path) -> None:
    async with arena(tmp_path) as (fleet, client):
        started = await client.post("/api/arena/battles")
        assert started.status_code == 201
        battle = started.json()
        assert battle["object"] == "arena.battle"
        assert battle["self_match"] is False
        assert CHAT_MODEL not in started.text and EMBED_MODEL not in started.text

        answers = {side: await answer(client, battle["id"], side) for side in "ab"}
        for side, response in answers.items():
            assert response.status_code == 200, response.text
            assert response.headers["content-type"].startswith("text/event-stream")
            assert CHAT_MODEL not in response.text and EMBED_MODEL not in response.text
            events = sse_events(response.text)
            assert events[-1] == "[DONE]"
            chunks = events[:-1]
            assert {chunk["model"] for chunk in chunks} == {f"model_{side}"}
            text = "".join(
                choice["delta"].get("content") or "" for c in chunks for choice in c["choices"]
            )
            assert text == "".join(REPLY)
            assert chunks[-1]["usage"]["completion_tokens"] == len(REPLY)
        asked = {request.model for request in fleet.worker.generate_requests}
        assert asked == {CHAT_MODEL, EMBED_MODEL}
        sent = fleet.worker.generate_requests[0]
        assert sent.sampling.temperature == pytest.approx(0.5)
        assert sent.stopping.max_tokens == 8

        voted = await client.post(
            "/api/arena/votes", json={"battle_id": battle["id"], "winner": "a"}
        )
        assert voted.status_code == 200
        result = voted.json()
        assert result["winner"] == "a"
        assert {result["model_a"], result["model_b"]} == {CHAT_MODEL, EMBED_MODEL}

        board = (await client.get("/api/arena/leaderboard")).json()
    assert board["total_votes"] == 1
    assert [(e["rank"], e["model"], e["votes"], e["wins"]) for e in board["data"]] == [
        (1, result["model_a"], 1, 1),
        (2, result["model_b"], 1, 0),
    ]
    assert board["data"][0]["rating"] > board["data"][1]["rating"]


async def test_votes_survive_a_restart(tmp_path: Path) -> None:
    async with arena(tmp_path) as (_, client):
        battle = (await client.post("/api/arena/battles")).json()
        for side in "ab":
            await answer(client, battle["id"], side)
        await client.post("/api/arena/votes", json={"battle_id": battle["id"], "winner": "tie"})
    async with arena(tmp_path) as (_, client):
        board = (await client.get("/api/arena/leaderboard")).json()
    assert board["total_votes"] == 1
    assert [entry["ties"] for entry in board["data"]] == [1, 1]


async def test_a_battle_started_on_one_gateway_is_voted_through_another(tmp_path: Path) -> None:
    """Two gateway apps on one store: the battle lives in the store, not in a gateway."""
    async with (
        arena(tmp_path) as (fleet, first),
        gateway_client(fleet.config, headers=AUTH) as second,
    ):
        battle = (await first.post("/api/arena/battles")).json()
        assert (await answer(first, battle["id"], "a")).status_code == 200
        assert (await answer(second, battle["id"], "b")).status_code == 200
        voted = await second.post(
            "/api/arena/votes", json={"battle_id": battle["id"], "winner": "b"}
        )
        again = await first.post(
            "/api/arena/votes", json={"battle_id": battle["id"], "winner": "a"}
        )
        boards = [(await c.get("/api/v1/leaderboard")).json() for c in (first, second)]
    assert voted.status_code == 200
    assert error_of(again)["code"] == "battle_decided"
    assert boards[0] == boards[1]
    assert boards[0]["total_votes"] == 1
    assert [e["model"] for e in boards[0]["data"]] == [
        voted.json()["model_b"],
        voted.json()["model_a"],
    ]


async def test_leaderboard_has_bradley_terry_intervals_and_mt_bench(tmp_path: Path) -> None:
    async with arena(tmp_path) as (fleet, client):
        for winner in ("a", "tie", "b", "a"):
            battle = (await client.post("/api/arena/battles")).json()
            for side in "ab":
                await answer(client, battle["id"], side)
            await client.post(
                "/api/arena/votes", json={"battle_id": battle["id"], "winner": winner}
            )
        # The eval command records its scores through the same store.
        async with await open_store(fleet.config.leaderboard_store_url) as store:
            await store.record_mtbench(
                [
                    MTBenchScore(CHAT_MODEL, "judge-1", 3.5, 4, 1),
                    MTBenchScore("only-evaluated", "judge-1", 6.0, 4, 0),
                    MTBenchScore("nothing-rated", "judge-1", 0.0, 0, 4),
                ]
            )
        response = await client.get("/api/v1/leaderboard")
        legacy = (await client.get("/api/arena/leaderboard")).json()
    assert response.status_code == 200
    board = response.json()
    assert board == legacy
    assert (board["object"], board["total_votes"]) == ("leaderboard", 4)
    voted, mt_only = board["data"][:2], board["data"][2:]
    assert {e["model"] for e in voted} == {CHAT_MODEL, EMBED_MODEL}
    for rank, entry in enumerate(voted, start=1):
        assert entry["rank"] == rank
        assert entry["votes"] == 4
        assert entry["ci_lower"] <= entry["rating"] <= entry["ci_upper"]
        assert entry["elo"] is not None
    assert voted[0]["rating"] >= voted[1]["rating"]
    assert voted[0]["rating"] + voted[1]["rating"] == pytest.approx(2000, abs=0.2)
    chat = next(e for e in voted if e["model"] == CHAT_MODEL)
    assert (chat["mt_bench"], chat["mt_bench_judge"]) == (3.5, "judge-1")
    assert next(e for e in voted if e["model"] == EMBED_MODEL)["mt_bench"] is None
    # A model with a score but no votes is listed, unranked; one with nothing rated is not.
    assert [(e["model"], e["rank"], e["rating"], e["mt_bench"]) for e in mt_only] == [
        ("only-evaluated", None, None, 6.0)
    ]


async def test_a_broken_store_is_503_not_a_crash(tmp_path: Path) -> None:
    async with arena(tmp_path) as (_, client):
        (tmp_path / "arena.sqlite3").write_bytes(b"not a database" * 100)
        board = await client.get("/api/v1/leaderboard")
        battle = await client.post("/api/arena/battles")
    for response in (board, battle):
        assert response.status_code == 503
        # The client is not told which file (or database host) failed; the log says.
        assert error_of(response)["message"] == (
            "The leaderboard store is unavailable; try again later."
        )


async def test_a_lone_chat_model_faces_itself(tmp_path: Path) -> None:
    async with arena(tmp_path) as (fleet, client):
        fleet.controller.routes.pop(EMBED_MODEL)
        battle = (await client.post("/api/arena/battles")).json()
        assert battle["self_match"] is True
        for side in "ab":
            assert (await answer(client, battle["id"], side)).status_code == 200
        voted = await client.post(
            "/api/arena/votes", json={"battle_id": battle["id"], "winner": "both_bad"}
        )
        board = (await client.get("/api/arena/leaderboard")).json()
    assert (voted.json()["model_a"], voted.json()["model_b"]) == (CHAT_MODEL, CHAT_MODEL)
    assert [(e["model"], e["votes"], e["rating"]) for e in board["data"]] == [
        (CHAT_MODEL, 1, 1000.0)
    ]


async def test_no_chat_model_means_no_battle(tmp_path: Path) -> None:
    async with arena(tmp_path) as (fleet, client):
        fleet.controller.routes.clear()
        response = await client.post("/api/arena/battles")
    assert response.status_code == 503
    assert error_of(response)["code"] == "service_unavailable"


async def test_errors_do_not_name_the_hidden_model(tmp_path: Path) -> None:
    async with arena(tmp_path) as (fleet, client):
        fleet.controller.routes.pop(EMBED_MODEL)
        fleet.worker.script = failing_script(
            InvalidRequestError(f"{CHAT_MODEL} cannot take this prompt", param="messages")
        )
        battle = (await client.post("/api/arena/battles")).json()
        early = await answer(client, battle["id"], "a")
        fleet.worker.script = failing_script(InvalidRequestError(f"{CHAT_MODEL} broke"), after=1)
        late = await answer(client, battle["id"], "b")
    assert early.status_code == 400
    assert error_of(early)["message"] == "model_a cannot take this prompt"
    assert CHAT_MODEL not in late.text
    errors = [e["error"] for e in sse_events(late.text) if isinstance(e, dict) and "error" in e]
    assert [e["message"] for e in errors] == ["model_b broke"]


# --- bad input -------------------------------------------------------------------------------


async def test_voting_needs_both_answers_and_only_once(tmp_path: Path) -> None:
    async with arena(tmp_path) as (_, client):
        battle_id = (await client.post("/api/arena/battles")).json()["id"]
        await answer(client, battle_id, "a")
        early = await client.post("/api/arena/votes", json={"battle_id": battle_id, "winner": "a"})
        await answer(client, battle_id, "b")
        first = await client.post("/api/arena/votes", json={"battle_id": battle_id, "winner": "b"})
        again = await client.post("/api/arena/votes", json={"battle_id": battle_id, "winner": "a"})
        after = await answer(client, battle_id, "a")
        board = (await client.get("/api/arena/leaderboard")).json()
    assert early.status_code == 400
    assert error_of(early)["param"] == "battle_id"
    assert first.status_code == 200
    for refused in (again, after):
        assert refused.status_code == 400
        assert error_of(refused)["code"] == "battle_decided"
    assert board["total_votes"] == 1


async def test_unknown_battles_are_404(tmp_path: Path) -> None:
    async with arena(tmp_path) as (_, client):
        vote = await client.post("/api/arena/votes", json={"battle_id": "nope", "winner": "a"})
        completion = await answer(client, "nope", "a")
    for response in (vote, completion):
        assert response.status_code == 404
        error = error_of(response)
        assert (error["code"], error["param"]) == ("battle_not_found", "battle_id")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/api/arena/votes", {"battle_id": "x", "winner": "left"}, "winner"),
        ("/api/arena/votes", {"winner": "a"}, "battle_id"),
        ("/api/arena/battles/{id}/completions", {"side": "c", "messages": MESSAGES}, "side"),
        ("/api/arena/battles/{id}/completions", {"side": "a", "messages": []}, "messages"),
        (
            "/api/arena/battles/{id}/completions",
            {"side": "a", "messages": MESSAGES, "temperature": 3},
            "temperature",
        ),
        ("/api/arena/battles/{id}/completions", {"side": "a"}, "messages"),
        (
            "/api/arena/battles/{id}/completions",
            {"side": "a", "messages": [{"role": "robot", "content": "hi"}]},
            "messages[0].role",
        ),
    ],
)
async def test_bad_bodies_are_400_naming_the_field(
    tmp_path: Path, path: str, body: dict[str, Any], param: str
) -> None:
    async with arena(tmp_path) as (_, client):
        battle_id = (await client.post("/api/arena/battles")).json()["id"]
        response = await client.post(path.format(id=battle_id), json=body)
    assert response.status_code == 400
    error = error_of(response)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


async def test_malformed_and_oversized_json_are_refused(tmp_path: Path) -> None:
    async with arena(tmp_path) as (_, client):
        malformed = await client.post("/api/arena/votes", content=b"{not json")
        huge = await client.post("/api/arena/votes", content=b"x" * (1024 * 1024 + 1))
    assert malformed.status_code == 400
    assert "JSON" in error_of(malformed)["message"]
    assert huge.status_code == 413


# --- stopping --------------------------------------------------------------------------------


async def test_leaving_an_arena_stream_cancels_the_worker_call(tmp_path: Path) -> None:
    async with (
        fake_fleet(arena_db=str(tmp_path / "arena.sqlite3")) as fleet,
        gateway_server(fleet.config) as url,
    ):
        fleet.worker.script = hanging_script(after=1)
        async with httpx.AsyncClient(base_url=url) as client:
            battle_id = (await client.post("/api/arena/battles")).json()["id"]
            async with client.stream(
                "POST",
                f"/api/arena/battles/{battle_id}/completions",
                json={"side": "a", "messages": MESSAGES},
            ) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if REPLY[0] in line:
                        break  # the first piece arrived: hang up, as the Stop button does
        await asyncio.wait_for(fleet.worker.generate_cancelled.wait(), WAIT_S)
