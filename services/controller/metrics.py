"""Prometheus metrics of the controller: the fleet as its registry sees it, read at scrape time."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.controller.registry import WorkerRegistry, WorkerState


class FleetCollector(Collector):
    """Workers by health state, and the SERVING workers of each model."""

    def __init__(self, registry: WorkerRegistry) -> None:
        self._registry = registry

    def describe(self) -> Iterable[Metric]:
        return _families()

    def collect(self) -> Iterable[Metric]:
        workers, model_workers = families = _families()
        records = self._registry.workers()
        by_state = dict.fromkeys(WorkerState, 0)  # every state, so a zero is a sample too
        serving: dict[str, int] = {}
        for record in records:
            by_state[record.state] += 1
            if record.state is WorkerState.SERVING:
                for info in record.models:
                    serving[info.name] = serving.get(info.name, 0) + 1
        for state, count in by_state.items():
            workers.add_metric([state.value], count)
        for model in sorted({info.name for record in records for info in record.models}):
            model_workers.add_metric([model], serving.get(model, 0))
        return families


def _families() -> list[GaugeMetricFamily]:
    return [
        GaugeMetricFamily(
            "chatfleet:controller_workers",
            "Registered workers by health state (unknown, serving, not_serving, unreachable).",
            labels=["state"],
        ),
        GaugeMetricFamily(
            "chatfleet:controller_model_workers",
            "SERVING workers of each registered model (canonical name); 0: requests fail.",
            labels=["model_name"],
        ),
    ]


def controller_metrics_registry(registry: WorkerRegistry) -> CollectorRegistry:
    """A registry of its own for one controller's metrics."""
    metrics = CollectorRegistry()
    metrics.register(FleetCollector(registry))
    return metrics
