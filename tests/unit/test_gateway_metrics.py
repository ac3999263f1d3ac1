"""The gateway's /metrics against fake gRPC servers: HTTP counts by route and status, per-model
latency histograms and token counts, and an independent registry per app."""

from __future__ import annotations

import httpx
from gateway_fakes import (
    CHAT_MODEL,
    EMBED_MODEL,
    REPLY,
    chat_body,
    fake_fleet,
    gateway_client,
    sse_events,
)
from prometheus_text import Scrape

PROMPT_TOKENS = len("What is the capital of France?".split())


async def scrape(client: httpx.AsyncClient) -> Scrape:
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


async def test_chat_completion_moves_request_latency_and_token_metrics() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 200
        metrics = await scrape(client)
    model = {"model_name": CHAT_MODEL}
    http = {"handler": "/v1/chat/completions", "method": "POST"}
    assert metrics.value("chatfleet:http_requests_total", **http, status="200") == 1
    assert metrics.value("chatfleet:http_request_duration_seconds_count", **http) == 1
    # One piece per message: the first is the first token, the other two are gaps.
    assert metrics.value("chatfleet:time_to_first_token_seconds_count", **model) == 1
    assert metrics.value("chatfleet:inter_token_latency_seconds_count", **model) == len(REPLY) - 1
    assert metrics.value("chatfleet:e2e_request_latency_seconds_count", **model) == 1
    assert metrics.value("chatfleet:request_success_total", **model, finished_reason="stop") == 1
    assert metrics.value("chatfleet:request_prompt_tokens_sum", **model) == PROMPT_TOKENS
    assert metrics.value("chatfleet:request_generation_tokens_sum", **model) == len(REPLY)


async def test_streamed_completions_count_each_choice_and_finish_reason() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        body = {"model": CHAT_MODEL, "prompt": "one two", "max_tokens": 2, "n": 2, "stream": True}
        response = await client.post("/v1/completions", json=body)
        assert sse_events(response.text)[-1] == "[DONE]"
        metrics = await scrape(client)
    model = {"model_name": CHAT_MODEL}
    assert metrics.value("chatfleet:time_to_first_token_seconds_count", **model) == 2
    assert metrics.value("chatfleet:inter_token_latency_seconds_count", **model) == 2
    assert metrics.value("chatfleet:request_success_total", **model, finished_reason="length") == 2
    assert metrics.value("chatfleet:request_prompt_tokens_sum", **model) == 2 * 2
    assert metrics.value("chatfleet:request_generation_tokens_sum", **model) == 2 * 2
    handler = {"handler": "/v1/completions", "method": "POST", "status": "200"}
    assert metrics.value("chatfleet:http_requests_total", **handler) == 1


async def test_echoed_prompt_is_not_the_first_token() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        await client.post(
            "/v1/completions", json={"model": CHAT_MODEL, "prompt": "a b c", "echo": True}
        )
        metrics = await scrape(client)
    model = {"model_name": CHAT_MODEL}
    assert metrics.value("chatfleet:time_to_first_token_seconds_count", **model) == 1
    assert metrics.value("chatfleet:inter_token_latency_seconds_count", **model) == len(REPLY) - 1


async def test_embeddings_count_prompt_tokens() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.post(
            "/v1/embeddings", json={"model": EMBED_MODEL, "input": ["a b", "c d e"]}
        )
        assert response.status_code == 200
        metrics = await scrape(client)
    model = {"model_name": EMBED_MODEL}
    assert metrics.value("chatfleet:request_prompt_tokens_sum", **model) == 5
    assert metrics.value("chatfleet:e2e_request_latency_seconds_count", **model) == 1
    assert metrics.value("chatfleet:time_to_first_token_seconds_count", **model) is None


async def test_errors_are_counted_by_status_and_unknown_models_add_no_series() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        missing = await client.post("/v1/chat/completions", json=chat_body(model="no-such"))
        bad = await client.post("/v1/chat/completions", json={"model": CHAT_MODEL})
        unknown_route = await client.get("/v2/whatever")
        card = await client.get(f"/v1/models/{CHAT_MODEL}")
        metrics = await scrape(client)
    assert (missing.status_code, bad.status_code, unknown_route.status_code) == (404, 400, 404)
    assert card.status_code == 200
    chat = {"handler": "/v1/chat/completions", "method": "POST"}
    assert metrics.value("chatfleet:http_requests_total", **chat, status="404") == 1
    assert metrics.value("chatfleet:http_requests_total", **chat, status="400") == 1
    assert metrics.value("chatfleet:http_requests_total", handler="other", status="404") == 1
    # Routes are labelled by template, never by the raw path.
    template = {"handler": "/v1/models/{model:path}", "method": "GET", "status": "200"}
    assert metrics.value("chatfleet:http_requests_total", **template) == 1
    for name in ("chatfleet:e2e_request_latency_seconds_count", "chatfleet:request_success_total"):
        assert "no-such" not in metrics.label_values(name, "model_name")


async def test_metrics_stay_open_when_api_keys_are_required_and_401s_are_counted() -> None:
    async with fake_fleet(api_keys=("sk-1",)) as fleet, gateway_client(fleet.config) as client:
        refused = await client.get("/v1/models")
        metrics = await scrape(client)  # no key
    assert refused.status_code == 401
    labels = {"handler": "/v1/models", "method": "GET", "status": "401"}
    assert metrics.value("chatfleet:http_requests_total", **labels) == 1


async def test_upstream_calls_in_flight_and_limit() -> None:
    async with (
        fake_fleet(max_concurrent_calls=7) as fleet,
        gateway_client(fleet.config) as client,
    ):
        metrics = await scrape(client)
    assert metrics.value("chatfleet:gateway_upstream_calls_in_flight") == 0
    assert metrics.value("chatfleet:gateway_upstream_calls_limit") == 7


async def test_each_app_has_its_own_registry() -> None:
    async with (
        fake_fleet() as fleet,
        gateway_client(fleet.config) as first,
        gateway_client(fleet.config) as second,
    ):
        await first.post("/v1/chat/completions", json=chat_body())
        one, other = await scrape(first), await scrape(second)
    model = {"model_name": CHAT_MODEL}
    assert one.value("chatfleet:e2e_request_latency_seconds_count", **model) == 1
    assert other.value("chatfleet:e2e_request_latency_seconds_count", **model) is None


async def test_openmetrics_is_served_on_request() -> None:
    async with fake_fleet() as fleet, gateway_client(fleet.config) as client:
        response = await client.get(
            "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
