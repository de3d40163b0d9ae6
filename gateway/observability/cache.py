"""The response cache's metrics: lookups by result and model, USD saved by policy, storage failures.

Lookups are counted in a plain dict and USD saved stays in integer nano-USD per policy until a scrape, as
the cost counters do (see `served`): a prometheus_client child's inc() costs more than the rest of a
repeated hit's counting.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from gateway.observability.access_log import AccessRecord
from gateway.observability.labels import NONE, LabelBounds
from gateway.observability.served import NANO_PER_USD

__all__ = ["CacheMetrics", "CACHE_OPERATIONS"]

CACHE_OPERATIONS = ("get", "put")


class CacheMetrics:
    """Counts what the response cache did for each request (from its access record) and its storage failures."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._errors = Counter("gateway_cache_store_errors", "Response cache storage calls that failed or timed "
                               "out (get, put); the request went on as a miss.", ("operation",), registry=registry)
        for operation in CACHE_OPERATIONS:
            self._errors.labels(operation)
        self._labels: dict[tuple[str, str | None], tuple[str, str]] = {}   # raw -> bounded (result, model)
        self._lookups: dict[tuple[str, str], int] = {}
        self._saved: dict[tuple[str], int] = {}                           # (policy,) -> nano-USD
        created = time.time()
        registry.register(_DictCounter("gateway_cache_lookups", "Response cache lookups, by result (hit, miss, "
                                       "bypass, error: the store failed, served as a miss) and client model.",
                                       ("result", "model"), self._lookups, created))
        registry.register(_DictCounter("gateway_cache_saved_usd", "USD the response cache saved (what its hits' "
                                       "answers cost when bought), by budget policy (`none`: a hit no policy "
                                       "matched).", ("policy",), self._saved, created, unit=NANO_PER_USD))

    def request_served(self, record: AccessRecord, bounds: LabelBounds) -> None:
        """Count a request's lookup, and what a hit saved against each of its policies."""
        assert record.cache is not None
        raw = (record.cache, record.requested_model)
        labels = self._labels.get(raw)
        if labels is None:
            if len(self._labels) > 4096:     # raw model names come from clients
                self._labels = {}
            labels = self._labels[raw] = (record.cache, bounds.model(record.requested_model))
        self._lookups[labels] = self._lookups.get(labels, 0) + 1
        if record.saved_nano:
            for policy in record.policies or (NONE,):
                name = (bounds.policy(policy) if policy != NONE else NONE,)
                self._saved[name] = self._saved.get(name, 0) + record.saved_nano

    def store_failed(self, operation: str) -> None:
        """Count a cache storage call that failed."""
        self._errors.labels(operation).inc()


class _DictCounter(Collector):
    """A counter family read at scrape from `counts` (label values -> count), each count divided by `unit`."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...], counts: Mapping[Any, int],
                 created: float, unit: int = 1) -> None:
        self._name, self._documentation, self._labels = name, documentation, labels
        self._counts, self._created, self._unit = counts, created, unit

    def describe(self) -> list[CounterMetricFamily]:
        return [self._family()]

    def collect(self) -> Iterator[CounterMetricFamily]:
        family, unit = self._family(), self._unit
        for labels, count in list(self._counts.items()):
            family.add_metric(labels, count if unit == 1 else count / unit, created=self._created)
        yield family

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self._name, self._documentation, labels=self._labels)
