"""Prometheus metrics of a worker: its engines' load, KV cache use and token counters, read from
each engine's `stats()` when Prometheus scrapes (nothing is recorded on the generation path).

Names follow vLLM's engine metrics with the `chatfleet:` prefix (docs/metrics.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.worker.engine.interface import Engine

_LABELS = ["model_name"]


class EngineCollector(Collector):
    """One sample per engine (labelled with its canonical model name) of each metric."""

    def __init__(self, engines: Sequence[Engine]) -> None:
        self._engines = tuple(engines)

    def describe(self) -> Iterable[Metric]:
        return _Families().all()

    def collect(self) -> Iterable[Metric]:
        families = _Families()
        for engine in self._engines:
            label = [engine.description.name]
            stats = engine.stats()
            families.running.add_metric(label, stats.running)
            families.waiting.add_metric(label, stats.waiting)
            if stats.kv_cache_usage is not None:
                families.kv_cache_usage.add_metric(label, stats.kv_cache_usage)
            families.prompt_tokens.add_metric(label, stats.prompt_tokens)
            families.generation_tokens.add_metric(label, stats.generation_tokens)
            families.preemptions.add_metric(label, stats.preemptions)
            families.mask_seconds.add_metric(label, stats.structured_mask_seconds)
            families.step_seconds.add_metric(label, stats.step_seconds)
            families.prefix_queried.add_metric(label, stats.prefix_cache_queried_tokens)
            families.prefix_hits.add_metric(label, stats.prefix_cache_hit_tokens)
        return families.all()


class _Families:
    """Empty metric families of one scrape."""

    def __init__(self) -> None:
        self.running = GaugeMetricFamily(
            "chatfleet:num_requests_running",
            "Requests in the engine's running batch (decoded together each step).",
            labels=_LABELS,
        )
        self.waiting = GaugeMetricFamily(
            "chatfleet:num_requests_waiting",
            "Requests admitted and queued for a place in the running batch.",
            labels=_LABELS,
        )
        self.kv_cache_usage = GaugeMetricFamily(
            "chatfleet:kv_cache_usage_perc",
            "KV cache use as a fraction (0-1) of the --kv-cache-tokens budget.",
            labels=_LABELS,
        )
        self.prompt_tokens = CounterMetricFamily(
            "chatfleet:prompt_tokens",
            "Prompt tokens prefilled (not counting recomputation after a preemption).",
            labels=_LABELS,
        )
        self.generation_tokens = CounterMetricFamily(
            "chatfleet:generation_tokens", "Tokens generated (sampled).", labels=_LABELS
        )
        self.preemptions = CounterMetricFamily(
            "chatfleet:num_preemptions",
            "Requests sent back to the queue because the KV cache budget was full.",
            labels=_LABELS,
        )
        self.mask_seconds = CounterMetricFamily(
            "chatfleet:structured_output_mask_seconds",
            "Seconds spent computing and applying structured-output (grammar) token masks.",
            labels=_LABELS,
        )
        self.step_seconds = CounterMetricFamily(
            "chatfleet:engine_step_seconds",
            "Seconds spent in engine steps (forward, masks and sampling).",
            labels=_LABELS,
        )
        self.prefix_queried = CounterMetricFamily(
            "chatfleet:prefix_cache_queried_tokens",
            "Tokens looked up in the prefix cache (every admission, resumed preemptions included).",
            labels=_LABELS,
        )
        self.prefix_hits = CounterMetricFamily(
            "chatfleet:prefix_cache_hit_tokens",
            "Tokens whose keys and values the prefix cache supplied instead of a forward.",
            labels=_LABELS,
        )

    def all(self) -> list[Metric]:
        return [
            self.running,
            self.waiting,
            self.kv_cache_usage,
            self.prompt_tokens,
            self.generation_tokens,
            self.preemptions,
            self.mask_seconds,
            self.step_seconds,
            self.prefix_queried,
            self.prefix_hits,
        ]


def worker_metrics_registry(engines: Sequence[Engine]) -> CollectorRegistry:
    """A registry of its own for one worker's metrics."""
    registry = CollectorRegistry()
    registry.register(EngineCollector(engines))
    return registry
