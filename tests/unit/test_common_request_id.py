"""The request-id modules themselves: the ContextVar side free of grpc (the engine's child
processes import it), the gRPC side reading `x-request-id` metadata."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from services.common import limits, request_id
from services.common.grpc_request_id import request_id_from_metadata
from services.common.request_id import (
    bind_request_id,
    bound_request_id,
    current_request_id,
    valid_request_id,
)


@pytest.mark.parametrize("module", ["services.common.request_id", "services.common.logs"])
def test_the_context_side_does_not_import_grpc(module: str) -> None:
    check = f"import sys, {module}; assert 'grpc' not in sys.modules, 'grpc was imported'"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_ids_are_checked_against_the_pattern_of_limits() -> None:
    assert request_id.REQUEST_ID_PATTERN is limits.REQUEST_ID_PATTERN
    assert valid_request_id("trace-42:a/b+c=d_e.f") == "trace-42:a/b+c=d_e.f"
    for bad in (None, "", "a b", "tab\t", "x" * 129, "é"):
        assert valid_request_id(bad) is None


def test_metadata_id_is_taken_when_valid() -> None:
    assert request_id_from_metadata((("other", "1"), ("x-request-id", "abc-1"))) == "abc-1"
    assert request_id_from_metadata((("x-request-id", b"abc-2"),)) == "abc-2"
    assert request_id_from_metadata((("x-request-id", "a b"),)) is None
    assert request_id_from_metadata((("other", "1"),)) is None
    assert request_id_from_metadata(None) is None


async def test_bound_for_a_block_and_bound_for_the_rest_of_a_task() -> None:
    assert current_request_id() is None
    with bound_request_id("block"):
        assert current_request_id() == "block"
    assert current_request_id() is None

    async def handler() -> str | None:
        bind_request_id("task")
        await asyncio.sleep(0)
        return current_request_id()

    assert await asyncio.create_task(handler()) == "task"
    assert current_request_id() is None  # the task's context only
