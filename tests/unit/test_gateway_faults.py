"""The gateway under faults, against fake workers: retries that clients never see, 429 when every
worker is full, the gateway's own bound on calls in flight, deadlines by route, recovery of worker
selection while the controller is away, and what reaches the logs at INFO."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence

import grpc
import httpx
import pytest
from gateway_fakes import (
    REPLY,
    chat_body,
    failing_script,
    fake_fleet,
    gateway_client,
    gateway_server,
    hanging_script,
    reply_script,
    sse_events,
)

from chatfleet.v1 import common_pb2, controller_pb2, worker_pb2
from services.common.errors import OverloadedError, UnavailableError
from services.gateway.clients import Deadline, Upstream, WorkerPool

WAIT_S = 10.0


def _content(response_json: dict) -> str:  # type: ignore[type-arg]
    return str(response_json["choices"][0]["message"]["content"])


async def test_worker_unavailable_before_output_is_retried_on_another() -> None:
    async with fake_fleet(workers=2) as fleet, gateway_client(fleet.config) as client:
        fleet.workers[0].script = failing_script(UnavailableError("draining"))
        response = await client.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 200, response.text
        assert _content(response.json()) == "".join(REPLY)
        assert [len(w.generate_requests) for w in fleet.workers] == [1, 1]
        # The second selection excluded the worker that failed.
        assert list(fleet.controller.select_requests[1].exclude_addresses) == [
            fleet.workers[0].address
        ]


async def test_full_worker_is_skipped_for_one_with_room() -> None:
    async with fake_fleet(workers=2) as fleet, gateway_client(fleet.config) as client:
        fleet.workers[0].script = failing_script(OverloadedError("queue full"))
        response = await client.post("/v1/chat/completions", json=chat_body(stream=True))
        assert response.status_code == 200, response.text
        events = sse_events(response.text)
        assert events[-1] == "[DONE]"
        assert not any(isinstance(e, dict) and "error" in e for e in events)


async def test_every_worker_full_gives_429_with_retry_after() -> None:
    async with fake_fleet(workers=2) as fleet, gateway_client(fleet.config) as client:
        for worker in fleet.workers:
            worker.script = failing_script(OverloadedError("queue full"))
        for stream in (False, True):
            response = await client.post("/v1/chat/completions", json=chat_body(stream=stream))
            assert response.status_code == 429, response.text
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["type"] == "rate_limit_error"
        # Each worker was tried once per request, not more.
        assert [len(w.generate_requests) for w in fleet.workers] == [2, 2]


async def test_worker_dying_mid_stream_ends_it_with_an_error_then_done() -> None:
    async with fake_fleet(workers=2) as fleet, gateway_client(fleet.config) as client:
        fleet.workers[0].script = failing_script(UnavailableError("connection reset"), after=1)
        response = await client.post("/v1/chat/completions", json=chat_body(stream=True))
        events = sse_events(response.text)
        assert events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "service_unavailable"
        # Output was produced: the request is not replayed on the other worker.
        assert len(fleet.workers[1].generate_requests) == 0

        response = await client.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "service_unavailable"


async def test_gateway_bounds_its_calls_in_flight() -> None:
    async with (
        fake_fleet(max_concurrent_calls=1) as fleet,
        gateway_server(fleet.config) as url,
        httpx.AsyncClient(base_url=url, timeout=WAIT_S) as client,
    ):
        fleet.worker.script = hanging_script()
        first = asyncio.create_task(client.post("/v1/chat/completions", json=chat_body()))
        await asyncio.wait_for(fleet.worker.generate_started.wait(), WAIT_S)
        refused = await client.post("/v1/chat/completions", json=chat_body(stream=True))
        assert refused.status_code == 429
        assert "retry-after" in refused.headers
        assert len(fleet.worker.generate_requests) == 1  # the refused one never reached it
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await asyncio.wait_for(fleet.worker.generate_cancelled.wait(), WAIT_S)
        fleet.worker.script = reply_script
        # The slot is free again once the cancelled call has unwound.
        response = await client.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 200, response.text
        assert len(fleet.worker.generate_requests) == 2


async def test_stream_without_a_first_token_in_time_gets_504() -> None:
    async with (
        fake_fleet(first_token_timeout_seconds=0.2) as fleet,
        gateway_client(fleet.config) as client,
    ):
        fleet.worker.script = hanging_script()
        response = await client.post("/v1/chat/completions", json=chat_body(stream=True))
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "timeout"
        await asyncio.wait_for(fleet.worker.generate_cancelled.wait(), WAIT_S)


async def test_stream_past_its_total_cap_ends_with_an_error_then_done() -> None:
    # The first piece must come before the cap (else the answer is a 504, as below): a cap with
    # room for a busy machine (0.3 s once ran out in a full run on two cores).
    async with (
        fake_fleet(stream_timeout_seconds=2.0) as fleet,
        gateway_client(fleet.config) as client,
    ):
        fleet.worker.script = hanging_script(after=1)
        response = await client.post("/v1/chat/completions", json=chat_body(stream=True))
        assert response.status_code == 200
        events = sse_events(response.text)
        assert events[1]["choices"][0]["delta"]["content"] == REPLY[0]
        assert events[-2]["error"]["code"] == "timeout"
        assert events[-1] == "[DONE]"


async def test_non_streamed_request_past_its_deadline_gets_504() -> None:
    async with (
        fake_fleet(request_timeout_seconds=0.2) as fleet,
        gateway_client(fleet.config) as client,
    ):
        fleet.worker.script = hanging_script(after=1)
        response = await client.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 504


# --- worker selection while the controller recovers -----------------------------------------------


def _rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=code.name)


class ScriptedController:
    """Stands in for ControllerClient: SelectWorker fails with `codes` in turn, then answers."""

    def __init__(self, codes: Sequence[grpc.StatusCode]) -> None:
        self.address = "controller"
        self.codes = list(codes)
        self.calls = 0

    async def select_worker(
        self, model: str, *, exclude: Sequence[str], timeout: float | None, metadata: object = ()
    ) -> controller_pb2.SelectWorkerResponse:
        self.calls += 1
        if self.codes:
            raise _rpc_error(self.codes.pop(0))
        return controller_pb2.SelectWorkerResponse(
            address="w", model=common_pb2.ModelInfo(name=model)
        )

    async def close(self) -> None:
        pass


def _upstream(controller: ScriptedController, select_timeout: float = WAIT_S) -> Upstream:
    return Upstream(
        controller,  # type: ignore[arg-type]
        WorkerPool(),
        worker_retries=1,
        select_timeout=select_timeout,
    )


async def test_selection_waits_out_an_unreachable_controller() -> None:
    controller = ScriptedController([grpc.StatusCode.UNAVAILABLE] * 3)
    upstream = _upstream(controller)
    selection = await upstream._select("m", [], Deadline(WAIT_S), ())
    assert selection.address == "w"
    assert controller.calls == 4


async def test_selection_retries_not_found_only_for_models_served_before() -> None:
    controller = ScriptedController([])
    upstream = _upstream(controller)
    await upstream._select("m", [], Deadline(WAIT_S), ())
    # The controller restarted and the workers are registering again.
    controller.codes = [grpc.StatusCode.NOT_FOUND] * 2
    assert (await upstream._select("m", [], Deadline(WAIT_S), ())).address == "w"
    # A model nobody ever served is a plain 404 at once.
    controller.codes = [grpc.StatusCode.NOT_FOUND]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upstream._select("never-served", [], Deadline(WAIT_S), ())
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_selection_gives_up_with_unavailable_after_select_timeout() -> None:
    controller = ScriptedController([grpc.StatusCode.UNAVAILABLE] * 1000)
    upstream = _upstream(controller, select_timeout=0.3)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await upstream._select("m", [], Deadline(WAIT_S), ())
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


# --- logs -----------------------------------------------------------------------------------------


async def test_no_prompt_completion_or_key_in_logs_at_info(
    caplog: pytest.LogCaptureFixture,
) -> None:
    prompt = "zebra-quartz-prompt-marker"
    key = "sk-key-marker-123"

    async def echo_prompt(
        request: worker_pb2.GenerateRequest,
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        # The "completion" repeats the prompt, so neither may show up in the logs.
        yield worker_pb2.GenerateResponse(text=request.chat.messages[0].content)
        raise UnavailableError("the worker died")

    headers = {"Authorization": f"Bearer {key}"}
    with caplog.at_level(logging.INFO):
        async with (
            fake_fleet(workers=2, api_keys=(key,)) as fleet,
            gateway_client(fleet.config, headers=headers) as client,
        ):
            fleet.workers[0].script = echo_prompt
            fleet.workers[1].script = failing_script(OverloadedError("full"))
            body = chat_body(messages=[{"role": "user", "content": prompt}])
            for stream in (False, True):
                await client.post("/v1/chat/completions", json={**body, "stream": stream})
            await client.post(
                "/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong-key"}
            )
            await client.post("/v1/embeddings", json={"model": "tiny-embed", "input": prompt})
    assert caplog.records, "nothing was logged: the test would prove nothing"
    for forbidden in (prompt, key, "wrong-key"):
        assert forbidden not in caplog.text
