"""The controller's Prometheus endpoint (workers by state, serving workers per model), and the
metrics HTTP server and --metrics-port flag the gRPC services share."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_text import Scrape

from services.common.metrics_server import MetricsServer, metrics_port
from services.controller import config as controller_config
from services.controller.config import ControllerConfig
from services.controller.main import Controller
from services.controller.registry import Load, ModelInfo, WorkerState
from services.worker import config as worker_config


async def get(url: str, **kwargs: object) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.get(url, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def controller() -> AsyncIterator[Controller]:
    controller = await Controller.start(ControllerConfig(port=0, metrics_port=0))
    try:
        yield controller
    finally:
        await controller.stop(grace=0)


async def test_workers_by_state_and_serving_workers_per_model(controller: Controller) -> None:
    assert controller.metrics is not None
    empty = Scrape((await get(controller.metrics.url)).text)
    for state in WorkerState:
        assert empty.value("chatfleet:controller_workers", state=state.value) == 0

    registry = controller.registry
    chat, embed = ModelInfo("chat", aliases=("chat-alias",)), ModelInfo("embed")
    registry.register("10.0.0.1:1", [chat], Load())
    registry.register("10.0.0.2:1", [chat, embed], Load())
    registry.register("10.0.0.3:1", [embed], Load())
    registry.set_state("10.0.0.1:1", WorkerState.SERVING)
    registry.set_state("10.0.0.2:1", WorkerState.UNREACHABLE)
    metrics = Scrape((await get(controller.metrics.url)).text)
    assert metrics.value("chatfleet:controller_workers", state="serving") == 1
    assert metrics.value("chatfleet:controller_workers", state="unreachable") == 1
    assert metrics.value("chatfleet:controller_workers", state="unknown") == 1
    assert metrics.value("chatfleet:controller_workers", state="not_serving") == 0
    assert metrics.value("chatfleet:controller_model_workers", model_name="chat") == 1
    assert metrics.value("chatfleet:controller_model_workers", model_name="embed") == 0
    assert "chat-alias" not in metrics.label_values(
        "chatfleet:controller_model_workers", "model_name"
    )


async def test_metrics_server_answers_only_get_and_head_of_metrics() -> None:
    registry = CollectorRegistry()
    Counter("chatfleet:test_things", "Things.", registry=registry).inc(3)
    server = MetricsServer(registry, "127.0.0.1", 0)
    await server.start()
    try:
        assert server.port != 0
        ok = await get(server.url)
        assert ok.status_code == 200
        assert Scrape(ok.text).value("chatfleet:test_things_total") == 3
        async with httpx.AsyncClient() as client:
            head = await client.head(server.url)
            other = await client.get(f"http://127.0.0.1:{server.port}/")
            post = await client.post(server.url)
        assert (head.status_code, head.content) == (200, b"")
        assert int(head.headers["content-length"]) == len(ok.content)
        assert other.status_code == 404
        assert post.status_code == 405
        # A client that never finishes its request head does not stop others being served.
        _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /metrics HTTP/1.1\r\n")
        assert (await get(server.url)).status_code == 200
        writer.close()
    finally:
        await server.stop()


async def test_metrics_server_negotiates_openmetrics_and_stops_cleanly() -> None:
    registry = CollectorRegistry()
    Counter("chatfleet:test_things", "Things.", registry=registry).inc()
    server = MetricsServer(registry, "127.0.0.1", 0)
    await server.start()
    stopped = False
    try:
        async with httpx.AsyncClient() as client:
            open_metrics = await client.get(
                server.url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}
            )
            assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
            assert open_metrics.text.endswith("# EOF\n")
            # A kept-alive connection does not hold the stop up.
            assert (await client.get(server.url)).status_code == 200
            await server.stop()
            stopped = True
            with pytest.raises(httpx.ConnectError):
                await client.get(server.url)
        # The port is free again.
        again = MetricsServer(registry, "127.0.0.1", server.port)
        await again.start()
        await again.stop()
    finally:
        if not stopped:
            await server.stop()


async def test_a_taken_metrics_port_fails_the_start() -> None:
    first = MetricsServer(CollectorRegistry(), "127.0.0.1", 0)
    await first.start()
    try:
        with pytest.raises(OSError):
            await MetricsServer(CollectorRegistry(), "127.0.0.1", first.port).start()
    finally:
        await first.stop()


@pytest.mark.parametrize(
    ("text", "expected"), [("9100", 9100), ("0", 0), ("off", None), ("-1", None), ("", None)]
)
def test_metrics_port_values(text: str, expected: int | None) -> None:
    assert metrics_port(text) == expected


def test_metrics_port_flag_env_fallbacks_and_default_off() -> None:
    for module, env in (
        (controller_config, "CHATFLEET_CONTROLLER_METRICS_PORT"),
        (worker_config, "CHATFLEET_WORKER_METRICS_PORT"),
    ):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser, {env: "21011"})
        assert parser.parse_args([]).metrics_port == 21011
        assert parser.parse_args(["--metrics-port", "off"]).metrics_port is None
        parser = argparse.ArgumentParser()
        module.add_arguments(parser, {})
        assert parser.parse_args([]).metrics_port is None
    with pytest.raises(ValueError, match="--metrics-port"):
        ControllerConfig(metrics_port=70000)
