"""The request-path histogram exports what prometheus_client's own Histogram would for the same observations."""

from __future__ import annotations

import re

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway.observability.histograms import LoopHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0)
OBSERVED = [0.0, 0.001, 0.0010001, 0.01, 0.05, 0.1, 0.5, 1.0, 1.5, 30.0, 0.001]


def exposition(registry: CollectorRegistry) -> list[str]:
    """The exposition lines without the `_created` values (creation times differ)."""
    return [re.sub(r"(_created\{[^}]*\}) \S+", r"\1 T", line)
            for line in generate_latest(registry).decode().splitlines()]


def test_exposition_matches_prometheus_client_histogram() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    light = LoopHistogram("gateway_x_seconds", "Test durations.", ("route",), buckets=BUCKETS, registry=ours)
    reference = Histogram("gateway_x_seconds", "Test durations.", ("route",), buckets=BUCKETS, registry=theirs)
    for index, value in enumerate(OBSERVED):
        route = "a" if index % 3 else "b"
        light.labels(route).observe(value)
        reference.labels(route).observe(value)
    assert exposition(ours) == exposition(theirs)


def test_an_upper_bound_is_inclusive() -> None:
    registry = CollectorRegistry()
    histogram = LoopHistogram("gateway_y_seconds", "Test.", ("op",), buckets=BUCKETS, registry=registry)
    histogram.labels("reserve").observe(0.01)
    assert registry.get_sample_value("gateway_y_seconds_bucket", {"op": "reserve", "le": "0.001"}) == 0
    assert registry.get_sample_value("gateway_y_seconds_bucket", {"op": "reserve", "le": "0.01"}) == 1
    assert registry.get_sample_value("gateway_y_seconds_count", {"op": "reserve"}) == 1


def test_wrong_number_of_label_values_is_refused() -> None:
    histogram = LoopHistogram("gateway_z_seconds", "Test.", ("a", "b"), buckets=BUCKETS, registry=CollectorRegistry())
    with pytest.raises(ValueError):
        histogram.labels("only-one")
