"""Schemathesis against the gateway's own OpenAPI document: valid and invalid bodies for every
operation, sent in-process (ASGI) to the gateway wired to fake gRPC workers and controller.

Never a 5xx, and every answer matches what the document promises (status codes, content types,
response bodies); invalid bodies are refused. Derandomized and bounded, so CI runs the same cases.
"""

from __future__ import annotations

import tempfile
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation.case import Case
from starlette.types import Receive, Scope, Send

from services.gateway.app import create_app
from services.gateway.config import GatewayConfig
from tests.unit.gateway_fakes import CHAT_MODEL, fake_fleet

# Examples per operation and generation mode; the coverage phase adds its boundary cases.
MAX_EXAMPLES = 40


class _EveryModel(dict[str, list[str]]):
    """Routes of the fake controller that serve any model name, so that generated bodies reach
    the (fake) worker instead of stopping at a 404; unknown models are unit-tested."""

    def get(self, key: str, default: Any = None) -> list[str]:  # type: ignore[override]
        return super().get(key) or self[CHAT_MODEL]


class GatewayOnFakes:
    """The gateway app whose lifespan first starts a fake fleet in the same event loop (the one
    schemathesis runs ASGI apps in), and stops it after the gateway's own shutdown."""

    def __init__(self) -> None:
        self._app: Any = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            # Battles the fuzzer starts go to a throwaway arena store, not the working directory.
            with tempfile.TemporaryDirectory() as folder:
                async with fake_fleet(arena_db=f"{folder}/arena.sqlite3") as fleet:
                    fleet.controller.routes = _EveryModel(fleet.controller.routes)
                    self._app = create_app(fleet.config)
                    await self._app(scope, receive, send)
            return
        await self._app(scope, receive, send)


# The document /openapi.json serves (tests/unit/test_gateway_bad_input.py checks it is served).
schema = schemathesis.openapi.from_dict(create_app(GatewayConfig()).openapi())
schema.app = GatewayOnFakes()
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], deterministic=True
)
# The OpenAI API: its answers must be what the document promises. Other routes (FastChat's, the
# web UI's) are held to the one rule that matters for robustness: no server error.
OPENAI_ROUTES = (
    r"^/(health|v1/models|v1/models/\{model\}|v1/chat/completions|v1/completions|v1/embeddings)$"
)
openai_api = schema.include(path_regex=OPENAI_ROUTES)
other_routes = schema.exclude(path_regex=OPENAI_ROUTES)

FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@openai_api.parametrize()
@FUZZ
def test_openai_routes_answer_as_documented(case: Case) -> None:
    case.call_and_validate(
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            negative_data_rejection,
        ]
    )


@other_routes.parametrize()
@FUZZ
def test_other_routes_never_fail_with_a_server_error(case: Case) -> None:
    case.call_and_validate(checks=[not_a_server_error])
