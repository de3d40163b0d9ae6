"""Metric families of several worker processes, merged into one exposition (see gateway.peers).

A worker sends its own families as JSON (`encode`); the worker answering the scrape sums them per sample:
counters and histograms add up (their `_created` is the earliest), so a merged counter only ever grows
while every worker is in every scrape. Gauges add up too (requests in flight), except those in
MAX_GAUGES, whose worst worker is the truth. Gauges read from the shared store (budgets) are not merged:
the answering worker reads them once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

__all__ = ["encode", "decode", "merge", "MAX_GAUGES"]

MAX_GAUGES = frozenset({"gateway_breaker_state"})
"""Gauges merged by their highest value: a breaker open in any worker is open (0 closed, 1 half-open, 2 open)."""
_ADDED = frozenset({"counter", "histogram", "summary", "gaugehistogram"})
Pick = Callable[[str, float, float], float]   # (sample name, one worker's value, another's) -> merged


def encode(families: Iterable[Metric]) -> list[list[Any]]:
    """Families as JSON-able lists: name, help, type, unit and (name, labels, value) per sample."""
    return [[family.name, family.documentation, family.type, family.unit,
             [[sample.name, sample.labels, sample.value] for sample in family.samples]] for family in families]


def decode(encoded: Sequence[Sequence[Any]]) -> list[Metric]:
    """The families `encode` made (a value JSON could not carry, NaN, comes back as NaN)."""
    families = []
    for name, documentation, kind, unit, samples in encoded:
        family = Metric(name, documentation, kind, unit)
        for sample_name, labels, value in samples:
            family.samples.append(Sample(sample_name, labels, math.nan if value is None else value))
        families.append(family)
    return families


def merge(workers: Sequence[Sequence[Metric]]) -> list[Metric]:
    """One family per name, in the order first seen, with every worker's samples merged."""
    merged: dict[str, tuple[Metric, dict[tuple[str, tuple[tuple[str, str], ...]], float]]] = {}
    for families in workers:
        for family in families:
            if family.name not in merged:
                merged[family.name] = (Metric(family.name, family.documentation, family.type, family.unit), {})
            values = merged[family.name][1]
            pick = _picker(family)
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                values[key] = sample.value if key not in values else pick(sample.name, values[key], sample.value)
    result = []
    for family, values in merged.values():
        for (name, labels), value in values.items():
            family.samples.append(Sample(name, dict(labels), value))
        result.append(family)
    return result


def _picker(family: Metric) -> Pick:
    """How two workers' values of one sample of `family` combine."""
    if family.type in _ADDED:
        return lambda name, a, b: min(a, b) if name.endswith("_created") else a + b
    if family.name in MAX_GAUGES:
        return lambda _name, a, b: max(a, b)
    return lambda _name, a, b: a + b
