"""Reading Prometheus text exposition in tests: sample values by name and labels."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    """The samples of one /metrics body."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.samples = [
            sample for family in text_string_to_metric_families(text) for sample in family.samples
        ]

    def value(self, name: str, **labels: str) -> float | None:
        """The sample named `name` whose labels include `labels`; None when there is none."""
        matches = [
            sample.value
            for sample in self.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        ]
        assert len(matches) <= 1, f"{name} {labels} matches {len(matches)} samples"
        return matches[0] if matches else None

    def label_values(self, name: str, label: str) -> set[str]:
        """Every value `label` takes among the samples named `name`."""
        return {s.labels[label] for s in self.samples if s.name == name and label in s.labels}
