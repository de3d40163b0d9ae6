"""Histograms observed on the request path: plain integers per bucket, exported as Prometheus histograms.

The gateway observes four durations per request, all on its event-loop thread. prometheus_client's
Histogram takes a lock and half a dozen calls per observation; here an observation is one bisect and
two additions. `LoopHistogram` registers itself as a collector and exports the same histogram family
(cumulative `le` buckets, `_count`, `_sum`, `_created`) at scrape time, from a copy of each child's
counts, so a scrape in another thread sees one consistent histogram per child.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from itertools import accumulate

from prometheus_client import CollectorRegistry
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

__all__ = ["HistogramChild", "LoopHistogram"]


class HistogramChild:
    """The counts of one label set: `counts[i]` observations in bucket i (the last one is +Inf)."""

    __slots__ = ("counts", "sum", "created", "_bounds")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        """Count one observation (an upper bound is inclusive, as Prometheus' `le` says)."""
        self.counts[bisect_left(self._bounds, value)] += 1
        self.sum += value


class LoopHistogram(Collector):
    """A labelled histogram for one thread's observations, registered on `registry` as a collector."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], *, buckets: Sequence[float],
                 registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._bounds = tuple(sorted(float(bound) for bound in buckets if bound != float("inf")))
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        registry.register(self)

    def labels(self, *values: str) -> HistogramChild:
        """The child of one label set, made on first use."""
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values!r}")
            child = self._children[values] = HistogramChild(self._bounds)
        return child

    def describe(self) -> list[HistogramMetricFamily]:
        return [self._family()]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = self._family()
        les = [floatToGoString(bound) for bound in self._bounds] + ["+Inf"]
        for values, child in list(self._children.items()):
            counts, total, created = child.counts[:], child.sum, child.created
            cumulative = list(accumulate(counts))
            family.add_metric(list(values), list(zip(les, cumulative)), total)
            family.samples.append(Sample(f"{self.name}_created", dict(zip(self.labelnames, values)), created))
        yield family

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
