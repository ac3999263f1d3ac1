"""Routes of the web UI: the page and its assets (open, like /health), the JSON API behind the
arena and the leaderboard, also at GET /api/v1/leaderboard (behind the API key, like the OpenAI
routes), and the arena's store, opened and closed by the routes' lifespan (WebUIState).

Bodies, request contexts and responses go through the gateway's own helpers (http_helpers.py).
Arena answers stream through the gateway's own chat handler, so the browser never learns which
model stands behind side "a" or "b" until it has voted: the model names in every chunk and error
are replaced by the side's label.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.applications import Starlette

from chatfleet.v1 import common_pb2
from services.gateway.arena import Arena
from services.gateway.errors import APIError, to_api_error
from services.gateway.http_helpers import (
    EventStream,
    HandledError,
    gateway_state,
    json_response,
    parse_body,
    request_context,
    respond,
)
from services.gateway.protocol import (
    REQUEST_FIELD_NAMES,
    ChatCompletionRequest,
    ChatMessageParam,
    OpenAIRequestModel,
    StreamOptions,
)
from services.leaderboard.board import Board, Leaderboard
from services.leaderboard.store import (
    Battle,
    BattleDecidedError,
    BattleNotFoundError,
    BattleNotReadyError,
    Side,
    StoreUnavailableError,
    Winner,
    open_store,
)

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
ASSETS_PREFIX = "/ui"
# The page and its assets need no API key (they hold no data); the page asks for the key.
PUBLIC_PATHS = frozenset(
    {
        "/",
        f"{ASSETS_PREFIX}/app.js",
        f"{ASSETS_PREFIX}/style.css",
        f"{ASSETS_PREFIX}/vendor/marked.umd.js",
        f"{ASSETS_PREFIX}/vendor/purify.min.js",
    }
)
_SIDE_LABELS = {"a": "model_a", "b": "model_b"}
# An arena request holds one short conversation: its body may be at most this large (and, as
# every body, at most --max-body-bytes).
MAX_BODY_BYTES = 1024 * 1024


# --- request and response bodies -------------------------------------------------------------


class ArenaCompletionRequest(OpenAIRequestModel):
    """A chat completion asked of one side of a battle; always streamed."""

    side: Side
    messages: list[ChatMessageParam] = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=2**32 - 1)


class VoteRequest(OpenAIRequestModel):
    battle_id: str = Field(min_length=1, max_length=64)
    winner: Winner


class BattleResponse(BaseModel):
    id: str
    object: Literal["arena.battle"] = "arena.battle"
    created: int
    # True when only one chat model is served and it faces itself.
    self_match: bool


class VoteResponse(BaseModel):
    battle_id: str
    object: Literal["arena.vote"] = "arena.vote"
    winner: str
    model_a: str
    model_b: str


class LeaderboardEntry(BaseModel):
    """One model. Arena fields are null for a model with an MT-bench score but no votes."""

    # Rank by arena rating; models without votes have none.
    rank: int | None
    model: str
    # Bradley-Terry rating (Elo scale) and its bootstrap 95% interval.
    rating: float | None
    ci_lower: float | None
    ci_upper: float | None
    # Online Elo over the votes in order (what the leaderboard showed before).
    elo: float | None
    votes: int
    wins: int
    losses: int
    ties: int
    # Mean MT-bench single-answer score (1-10) and the judge that gave it.
    mt_bench: float | None
    mt_bench_judge: str | None


class LeaderboardResponse(BaseModel):
    object: Literal["leaderboard"] = "leaderboard"
    total_votes: int
    bootstrap_rounds: int
    data: list[LeaderboardEntry]

    @classmethod
    def of(cls, board: Board) -> LeaderboardResponse:
        def points(value: float | None) -> float | None:
            return None if value is None else round(value, 1)

        return cls(
            total_votes=board.total_votes,
            bootstrap_rounds=board.bootstrap_rounds,
            data=[
                LeaderboardEntry(
                    rank=e.rank,
                    model=e.model,
                    rating=points(e.rating),
                    ci_lower=points(e.ci_lower),
                    ci_upper=points(e.ci_upper),
                    elo=points(e.elo),
                    votes=e.votes,
                    wins=e.wins,
                    losses=e.losses,
                    ties=e.ties,
                    mt_bench=None if e.mt_bench is None else round(e.mt_bench.score, 2),
                    mt_bench_judge=None if e.mt_bench is None else e.mt_bench.judge,
                )
                for e in board.entries
            ],
        )


class UIModel(BaseModel):
    id: str
    supports_chat: bool
    supports_embeddings: bool


class UIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[UIModel]


# Field names, to tell them from union tags in error paths (messages nest the OpenAI ones).
_FIELD_NAMES = (
    frozenset(ArenaCompletionRequest.model_fields)
    | frozenset(VoteRequest.model_fields)
    | REQUEST_FIELD_NAMES
)


# --- helpers ---------------------------------------------------------------------------------


def chat_models(models: list[common_pb2.ModelInfo]) -> list[str]:
    """Names of the models that chat. A model that declares no capability at all (kind unset)
    is kept: better offered and refused than hidden."""
    names = {
        model.name
        for model in models
        if model.supports_chat or model.kind == common_pb2.MODEL_KIND_UNSPECIFIED
    }
    return sorted(names)


def _battle_not_found(battle_id: str) -> APIError:
    return APIError(
        404,
        f"No arena battle '{battle_id}': it does not exist or has expired; start a new one.",
        "invalid_request_error",
        "battle_id",
        "battle_not_found",
    )


def _already_voted() -> APIError:
    return APIError(
        400,
        "This battle already has a vote; start a new one.",
        "invalid_request_error",
        "battle_id",
        "battle_decided",
    )


def _hide(text: str, name: str, label: str) -> str:
    return text.replace(name, label) if name else text


def _anonymous(event: str, name: str, label: str) -> str:
    """An SSE event of the chat stream with the model's name replaced by the side's label."""
    prefix = "data: "
    if not event.startswith(prefix + "{"):
        return event
    payload: dict[str, Any] = json.loads(event[len(prefix) :])
    if "model" in payload:
        payload["model"] = label
    error = payload.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        error["message"] = _hide(error["message"], name, label)
    return f"{prefix}{json.dumps(payload)}\n\n"


async def _anonymous_events(
    events: AsyncIterator[str], name: str, label: str
) -> AsyncIterator[str]:
    async for event in events:
        yield _anonymous(event, name, label)


# --- routes ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebUIState:
    """The arena and the leaderboard over one store, from start-up to shutdown; kept on
    `app.state.webui`."""

    arena: Arena
    leaderboard: Leaderboard

    def install(self, app: Starlette) -> None:
        app.state.webui = self


def webui_state(app: Starlette) -> WebUIState:
    state: WebUIState = app.state.webui
    return state


class WebUIRoutes:
    """The web UI's endpoints, built on the gateway's own helpers and state."""

    @staticmethod
    def _arena(request: Request) -> Arena:
        return webui_state(request.app).arena

    async def index(self, request: Request) -> Response:
        # no-cache: the page is revalidated (cheaply, by ETag) so an upgrade shows at once.
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def models(self, request: Request) -> Response:
        """The served models with what they can do (the OpenAI list does not say)."""
        ctx = request_context(request)
        infos = await gateway_state(request.app).upstream.list_models(
            deadline=ctx.deadline, metadata=ctx.metadata
        )
        chat = set(chat_models(infos))
        by_name = {info.name: info for info in infos}
        return json_response(
            UIModelList(
                data=[
                    UIModel(
                        id=name,
                        supports_chat=name in chat,
                        supports_embeddings=by_name[name].supports_embeddings,
                    )
                    for name in sorted(by_name)
                ]
            )
        )

    async def start_battle(self, request: Request) -> Response:
        ctx = request_context(request)
        infos = await gateway_state(request.app).upstream.list_models(
            deadline=ctx.deadline, metadata=ctx.metadata
        )
        names = chat_models(infos)
        if not names:
            raise APIError(
                503,
                "No chat model is being served: the arena needs at least one.",
                "server_error",
                code="service_unavailable",
            )
        battle = await self._arena(request).start(names)
        logger.info("arena battle %s started", battle.id)
        return json_response(
            BattleResponse(id=battle.id, created=int(battle.created), self_match=battle.self_match),
            status_code=201,
        )

    async def battle_completion(self, request: Request, battle_id: str) -> Response:
        body = await parse_body(
            request, ArenaCompletionRequest, _FIELD_NAMES, max_bytes=MAX_BODY_BYTES
        )
        try:
            battle: Battle = await self._arena(request).ask(battle_id, body.side)
        except BattleNotFoundError:
            raise _battle_not_found(battle_id) from None
        except BattleDecidedError:
            raise _already_voted() from None
        name, label = battle.model(body.side), _SIDE_LABELS[body.side]
        chat = ChatCompletionRequest(
            model=name,
            messages=body.messages,
            temperature=body.temperature,
            top_p=body.top_p,
            max_tokens=body.max_tokens,
            stream=True,
            stream_options=StreamOptions(include_usage=True),
        )
        return await respond(request, self._anonymous_stream(request, chat, name, label))

    async def _anonymous_stream(
        self, request: Request, chat: ChatCompletionRequest, name: str, label: str
    ) -> BaseModel | EventStream:
        try:
            result = await gateway_state(request.app).chat.create_chat_completion(
                chat, request_context(request)
            )
        except HandledError as error:
            api_error = to_api_error(error)
            api_error.message = _hide(api_error.message, name, label)
            raise api_error from None
        assert isinstance(result, EventStream)  # stream=True
        return EventStream(_anonymous_events(result.events, name, label), result.close)

    async def vote(self, request: Request) -> Response:
        body = await parse_body(request, VoteRequest, _FIELD_NAMES, max_bytes=MAX_BODY_BYTES)
        # One atomic write in the store: two votes racing on a battle, through this gateway or
        # another, cannot both count.
        try:
            vote = await self._arena(request).vote(body.battle_id, body.winner)
        except BattleNotFoundError:
            raise _battle_not_found(body.battle_id) from None
        except BattleDecidedError:
            raise _already_voted() from None
        except BattleNotReadyError:
            raise APIError(
                400,
                "Both models must be asked to answer before a vote.",
                "invalid_request_error",
                "battle_id",
            ) from None
        logger.info("arena battle %s: vote %s", vote.battle_id, vote.winner)
        return json_response(
            VoteResponse(
                battle_id=vote.battle_id,
                winner=vote.winner,
                model_a=vote.model_a,
                model_b=vote.model_b,
            )
        )

    async def leaderboard(self, request: Request) -> Response:
        """Arena ratings (Bradley-Terry with bootstrap intervals, online Elo) and MT-bench scores
        from the shared store."""
        board = webui_state(request.app).leaderboard
        return json_response(LeaderboardResponse.of(await board.board()))


def _router(routes: WebUIRoutes) -> APIRouter:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The gateway's lifespan, which installs its state, has started before this one.
        config = gateway_state(app).config
        # A PostgreSQL store that cannot be reached stops the start-up here, saying why.
        try:
            store = await open_store(config.leaderboard_store_url)
        except StoreUnavailableError as error:
            logger.error("the gateway cannot start: %s", error)
            raise
        WebUIState(Arena(store, random.Random()), Leaderboard(store)).install(app)
        logger.info("arena battles and votes are kept in the %s", store.description)
        try:
            yield
        finally:
            await store.close()

    router = APIRouter(lifespan=lifespan)
    endpoints: list[tuple[str, Callable[..., Awaitable[Response]], str]] = [
        ("/", routes.index, "GET"),
        ("/api/models", routes.models, "GET"),
        ("/api/arena/battles", routes.start_battle, "POST"),
        ("/api/arena/battles/{battle_id}/completions", routes.battle_completion, "POST"),
        ("/api/arena/votes", routes.vote, "POST"),
        ("/api/arena/leaderboard", routes.leaderboard, "GET"),
        ("/api/v1/leaderboard", routes.leaderboard, "GET"),
    ]
    for path, endpoint, method in endpoints:
        router.add_api_route(
            path,
            endpoint,
            methods=[method],
            include_in_schema=path != "/",
            # Documents the leaderboard's JSON in /openapi.json (the handler builds it itself).
            response_model=LeaderboardResponse if endpoint == routes.leaderboard else None,
        )
    return router


def install_webui(app: FastAPI) -> None:
    """Add the page, its assets and the arena API to the gateway app."""
    app.include_router(_router(WebUIRoutes()))
    app.mount(ASSETS_PREFIX, StaticFiles(directory=STATIC_DIR), name="webui-assets")
