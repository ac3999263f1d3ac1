"""The gateway's Prometheus metrics, served at /metrics: HTTP requests by route and status, and
per-model request latencies and token counts measured on the streams coming back from workers.

Names follow vLLM's with the `chatfleet:` prefix (docs/metrics.md has the mapping). Every metric
lives in the app's own CollectorRegistry, so several gateways can run in one process (tests).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from contextlib import aclosing
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatfleet.v1 import worker_pb2
from services.gateway.clients import Deadline, Metadata, Upstream
from services.gateway.http_helpers import gateway_state
from services.gateway.translation import finish_reason

METRICS_PATH = "/metrics"

# vLLM's buckets for the same histograms.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                300.0, 600.0)  # fmt: skip

# vLLM's finished_reason label values; any other finish reason (a tool call) counts as "stop".
FINISHED_REASONS = frozenset({"stop", "length", "abort"})
# Any other method a client sends is counted as "other": labels must stay a small set.
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class GatewayMetrics:
    """The gateway's metrics, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.http_requests = Counter(
            "chatfleet:http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["handler", "method", "status"],
            registry=registry,
        )
        self.http_duration = Histogram(
            "chatfleet:http_request_duration_seconds",
            "Time from a request's arrival to the end of its response (streams included).",
            ["handler", "method"],
            buckets=HTTP_BUCKETS,
            registry=registry,
        )
        model = ["model_name"]
        self.time_to_first_token = Histogram(
            "chatfleet:time_to_first_token_seconds",
            "Time from the gateway's call to the first generated token of a completion "
            "(worker choice, queueing and prefill included).",
            model,
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.inter_token_latency = Histogram(
            "chatfleet:inter_token_latency_seconds",
            "Time between two streamed pieces of a completion (usually one token each).",
            model,
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.e2e_latency = Histogram(
            "chatfleet:e2e_request_latency_seconds",
            "Time from the gateway's call to the end of a completion or embedding call.",
            model,
            buckets=E2E_BUCKETS,
            registry=registry,
        )
        self.request_prompt_tokens = Histogram(
            "chatfleet:request_prompt_tokens",
            "Prompt tokens of each finished call (embeddings included); _sum counts them all.",
            model,
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.request_generation_tokens = Histogram(
            "chatfleet:request_generation_tokens",
            "Completion tokens of each finished completion; _sum counts them all.",
            model,
            buckets=TOKEN_BUCKETS,
            registry=registry,
        )
        self.request_success = Counter(
            "chatfleet:request_success",
            "Completions that finished, by finish reason (stop, length, abort).",
            ["model_name", "finished_reason"],
            registry=registry,
        )

    def generation(self, model: str) -> GenerationObserver:
        """An observer for one Generate call of `model`, its clock started now."""
        return GenerationObserver(self, model)


class GenerationObserver:
    """Times one Generate stream: first token, gaps between pieces, end; counts its tokens."""

    def __init__(self, metrics: GatewayMetrics, model: str) -> None:
        self._metrics = metrics
        self._model = model
        self._start = time.perf_counter()
        self._last_token: float | None = None

    def observe(self, response: worker_pb2.GenerateResponse) -> None:
        now = time.perf_counter()
        metrics, model = self._metrics, self._model
        if response.token_ids and not response.is_prompt_echo:
            if self._last_token is None:
                metrics.time_to_first_token.labels(model).observe(now - self._start)
            else:
                metrics.inter_token_latency.labels(model).observe(now - self._last_token)
            self._last_token = now
        if response.finish_reason:
            reason = finish_reason(response.finish_reason)
            if reason not in FINISHED_REASONS:
                reason = "stop"
            metrics.e2e_latency.labels(model).observe(now - self._start)
            metrics.request_success.labels(model, reason).inc()
            metrics.request_prompt_tokens.labels(model).observe(response.usage.prompt_tokens)
            metrics.request_generation_tokens.labels(model).observe(
                response.usage.completion_tokens
            )


class MeteredUpstream(Upstream):
    """Upstream whose generation and embedding calls feed GatewayMetrics. Labels are only
    created from answers, so a client naming models that do not exist adds no series."""

    def __init__(self, *args: Any, metrics: GatewayMetrics, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.metrics = metrics

    async def generate(
        self, request: worker_pb2.GenerateRequest, *, deadline: Deadline, metadata: Metadata = ()
    ) -> AsyncGenerator[worker_pb2.GenerateResponse, None]:
        observer = self.metrics.generation(request.model)
        stream = super().generate(request, deadline=deadline, metadata=metadata)
        # Closing this generator closes the inner one, which cancels the gRPC call.
        async with aclosing(stream):
            async for response in stream:
                observer.observe(response)
                yield response

    async def embed(
        self, request: worker_pb2.EmbedRequest, *, deadline: Deadline, metadata: Metadata = ()
    ) -> worker_pb2.EmbedResponse:
        start = time.perf_counter()
        response = await super().embed(request, deadline=deadline, metadata=metadata)
        model = request.model
        self.metrics.e2e_latency.labels(model).observe(time.perf_counter() - start)
        self.metrics.request_prompt_tokens.labels(model).observe(response.prompt_tokens)
        return response


class _UpstreamCollector(Collector):
    """Calls in flight to workers against --max-concurrent-calls, read at scrape time."""

    def __init__(self, upstream: Callable[[], Upstream | None]) -> None:
        self._upstream = upstream

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        upstream = self._upstream()
        if upstream is not None:
            families[0].add_metric([], upstream.in_flight)
            families[1].add_metric([], upstream.max_concurrent_calls)
        return families

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "chatfleet:gateway_upstream_calls_in_flight",
                "Generation and embedding calls to workers under way (one per choice or prompt).",
            ),
            GaugeMetricFamily(
                "chatfleet:gateway_upstream_calls_limit",
                "--max-concurrent-calls: beyond it requests get 429.",
            ),
        ]


class HttpMetricsMiddleware:
    """Counts every HTTP request by route template, method and status, and times it to the end
    of its response body."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self._metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        # Unless a response starts, the error middleware outside answers 500.
        status = 500

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        finally:
            handler = _handler(scope)
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self._metrics.http_requests.labels(handler, method, str(status)).inc()
            self._metrics.http_duration.labels(handler, method).observe(time.perf_counter() - start)


def _handler(scope: Scope) -> str:
    """The route's path template (`/v1/models/{model:path}`), never the raw path: one label per
    route whatever clients send. A request answered before routing (401) is matched here; a path
    no route matches (404) is "other"."""
    route = scope.get("route")
    if route is None:
        router = getattr(scope.get("app"), "router", None)
        for candidate in getattr(router, "routes", ()):
            if candidate.matches(scope)[0] is not Match.NONE:
                route = candidate
                break
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "other"


async def _metrics_endpoint(request: Request) -> Response:
    metrics: GatewayMetrics = request.app.state.metrics
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(metrics.registry), headers={"Content-Type": content_type})


def install_metrics(app: FastAPI, registry: CollectorRegistry | None = None) -> GatewayMetrics:
    """Add /metrics and the HTTP metrics middleware to `app`; the lifespan's upstream must be a
    MeteredUpstream with the returned metrics for the per-model ones. Call it after the
    middleware whose responses are to be counted (API keys) has been added."""
    metrics = GatewayMetrics(registry if registry is not None else CollectorRegistry())
    app.state.metrics = metrics

    def upstream() -> Upstream | None:
        with contextlib.suppress(AttributeError):  # before start-up
            return gateway_state(app).upstream
        return None

    metrics.registry.register(_UpstreamCollector(upstream))
    app.add_api_route(METRICS_PATH, _metrics_endpoint, methods=["GET"], include_in_schema=False)
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    return metrics
