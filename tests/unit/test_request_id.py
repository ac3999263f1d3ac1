"""Request ids: set (or taken from the client) at the gateway, echoed in the response, sent as
`x-request-id` metadata to the controller and workers, bound by their gRPC servers, and stamped
on log records, in text and JSON."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest
from gateway_fakes import (
    FakeController,
    chat_body,
    failing_script,
    fake_fleet,
    gateway_client,
    sse_events,
)

from chatfleet.v1 import controller_pb2, worker_pb2
from services.common.errors import UnavailableError
from services.common.grpc_server import create_server, insecure_channel
from services.common.logs import configure_logging
from services.common.request_id import (
    RequestIdLogFilter,
    bound_request_id,
    current_request_id,
)

worker_log = logging.getLogger("tests.fake_worker")


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog, its records given their request id as chatfleet's log handler gives it."""
    request_filter = RequestIdLogFilter()
    caplog.handler.addFilter(request_filter)
    caplog.set_level(logging.INFO)
    try:
        yield caplog
    finally:
        caplog.handler.removeFilter(request_filter)


async def test_client_id_is_echoed_and_reaches_controller_worker_and_logs(
    monkeypatch: pytest.MonkeyPatch, logs: pytest.LogCaptureFixture
) -> None:
    seen_by_controller: list[str | None] = []
    select = FakeController.SelectWorker

    async def recording_select(
        self: FakeController,
        request: controller_pb2.SelectWorkerRequest,
        context: grpc.aio.ServicerContext,
    ) -> controller_pb2.SelectWorkerResponse:
        seen_by_controller.append(current_request_id())
        return await select(self, request, context)

    monkeypatch.setattr(FakeController, "SelectWorker", recording_select)
    seen_by_worker: list[str | None] = []

    async def logging_script(
        request: worker_pb2.GenerateRequest,
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        seen_by_worker.append(current_request_id())
        worker_log.info("fake worker generating")
        yield worker_pb2.GenerateResponse(
            text="hi", token_ids=[1], finish_reason=worker_pb2.FINISH_REASON_STOP
        )

    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        fleet.worker.script = logging_script
        response = await client.post(
            "/v1/chat/completions", json=chat_body(), headers={"X-Request-Id": "trace-42"}
        )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "trace-42"
    assert fleet.worker.metadata[0]["x-request-id"] == "trace-42"
    assert seen_by_controller == ["trace-42"]
    assert seen_by_worker == ["trace-42"]
    logged = [r for r in logs.records if r.getMessage() == "fake worker generating"]
    assert [r.request_id for r in logged] == ["trace-42"]  # type: ignore[attr-defined]


async def test_gateway_log_lines_carry_the_generated_id(
    logs: pytest.LogCaptureFixture,
) -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        # The stream fails after it started: the gateway logs a warning about it.
        fleet.worker.script = failing_script(UnavailableError("worker died"), after=1)
        response = await client.post("/v1/chat/completions", json=chat_body(stream=True))
    request_id = response.headers["x-request-id"]
    assert len(request_id) == 32  # a uuid4 hex made by the gateway
    assert "error" in sse_events(response.text)[-2]
    failed = [r for r in logs.records if "stream failed after it started" in r.getMessage()]
    assert failed
    assert {r.request_id for r in failed} == {request_id}  # type: ignore[attr-defined]
    # Records outside any request carry none.
    logging.getLogger("tests").info("after the request")
    assert logs.records[-1].request_id is None  # type: ignore[attr-defined]


def _echo_id_handlers() -> grpc.GenericRpcHandler:
    """/test.Echo/Unary answers the bound request id; /test.Echo/Stream yields it twice."""

    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return (current_request_id() or "").encode()

    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        for _ in range(2):
            yield (current_request_id() or "").encode()

    return grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )


async def test_grpc_servers_bind_the_metadata_id_per_call() -> None:
    server = create_server("127.0.0.1", 0, [])
    server.server.add_generic_rpc_handlers((_echo_id_handlers(),))
    await server.start()
    try:
        async with insecure_channel(f"127.0.0.1:{server.port}") as channel:
            unary = channel.unary_unary("/test.Echo/Unary")
            stream = channel.unary_stream("/test.Echo/Stream")
            with_id = (("x-request-id", "abc-1"),)
            assert await unary(b"", metadata=with_id) == b"abc-1"
            assert await unary(b"", metadata=(("x-request-id", "other"),)) == b"other"
            assert [m async for m in stream(b"", metadata=with_id)] == [b"abc-1", b"abc-1"]
            assert await unary(b"") == b""  # no metadata: no id
            # An id unsafe to log is ignored rather than trusted.
            assert await unary(b"", metadata=(("x-request-id", "a b"),)) == b""
    finally:
        await server.server.stop(None)


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Restore the root logger after a test that calls configure_logging."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _configured(fmt: str) -> io.StringIO:
    configure_logging("INFO", fmt)
    out = io.StringIO()
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(out)
    return out


@pytest.mark.usefixtures("root_logging")
def test_text_lines_show_the_id_in_brackets() -> None:
    out = _configured("text")
    log = logging.getLogger("services.test")
    with bound_request_id("req-7"):
        log.info("inside")
    log.info("outside")
    log.info("from the engine thread", extra={"request_id": "seq-3"})
    inside, outside, engine = out.getvalue().splitlines()
    assert inside.endswith("INFO services.test [req-7]: inside")
    assert outside.endswith("INFO services.test: outside")
    assert engine.endswith("[seq-3]: from the engine thread")


@pytest.mark.usefixtures("root_logging")
def test_json_lines_have_a_request_id_field() -> None:
    out = _configured("json")
    log = logging.getLogger("services.test")
    with bound_request_id("req-8"):
        log.warning("inside")
    log.warning("outside")
    inside, outside = (json.loads(line) for line in out.getvalue().splitlines())
    assert inside["request_id"] == "req-8"
    assert inside["message"] == "inside"
    assert "request_id" not in outside
