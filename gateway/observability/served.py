"""The counters every answered request moves: requests, tokens and cost, summed in process.

Several counters move on every request; as prometheus_client Counters each increment costs a lock and
a handful of calls. Here each kind of answer (route, model, provider, status class, charged policies)
has one `ServedTotals` of plain integers, and a custom collector sums them into the same metric
families at scrape time. Cost stays in integer nano-USD until then, so its sums are exact.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

__all__ = ["ServedKey", "ServedTotals", "ServedCollector"]

NANO_PER_USD = 1_000_000_000
REQUESTS, TOKENS, COST, POLICY_COST = range(4)   # the families, in the order of `_families`

ServedKey = tuple[str, str, str, str, tuple[str, ...]]
"""Label values of one kind of answer: route, model, provider, status class, charged policies."""


@dataclass(slots=True)
class ServedTotals:
    """What the answers of one kind added up to; the request path only adds to its fields."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_nano: int = 0
    charged: bool = False                    # some answer of this kind had usage or a cost
    created: float = field(default_factory=time.time)


class ServedCollector(Collector):
    """Exports the totals of every kind of answer as requests, tokens, cost and per-policy cost counters."""

    def __init__(self, totals: dict[ServedKey, ServedTotals]) -> None:
        self._totals = totals

    def describe(self) -> list[CounterMetricFamily]:
        return list(self._families())

    def collect(self) -> Iterator[CounterMetricFamily]:
        families = self._families()
        # per family: labels -> [sum, earliest creation]; cost families are summed in nano-USD
        sums: list[dict[tuple[str, ...], list[float]]] = [{} for _ in families]

        def add(family: int, labels: tuple[str, ...], value: int, created: float) -> None:
            entry = sums[family].setdefault(labels, [0, created])
            entry[0] += value
            entry[1] = min(entry[1], created)

        for (route, model, provider, status_class, policies), totals in list(self._totals.items()):
            created = totals.created
            add(REQUESTS, (route, model, provider, status_class), totals.requests, created)
            if totals.charged:
                add(TOKENS, (model, provider, "prompt"), totals.prompt_tokens, created)
                add(TOKENS, (model, provider, "completion"), totals.completion_tokens, created)
                add(TOKENS, (model, provider, "cached"), totals.cached_tokens, created)
                add(COST, (model, provider), totals.cost_nano, created)
                for policy in policies:
                    add(POLICY_COST, (policy, model, provider), totals.cost_nano, created)
        for index, family in enumerate(families):
            scale = NANO_PER_USD if index in (COST, POLICY_COST) else 1
            for labels, (value, created) in sums[index].items():
                family.add_metric(labels, value / scale if scale != 1 else value, created=created)
        yield from families

    @staticmethod
    def _families() -> tuple[CounterMetricFamily, ...]:
        return (
            CounterMetricFamily("gateway_requests", "Requests answered, by route pattern, model, provider and status class.",
                                labels=("route", "model", "provider", "status_class")),
            CounterMetricFamily("gateway_tokens", "Tokens charged, by model, provider and type (prompt, completion, cached).",
                                labels=("model", "provider", "type")),
            CounterMetricFamily("gateway_cost_usd", "USD charged, by model and provider.", labels=("model", "provider")),
            CounterMetricFamily("gateway_policy_cost_usd", "USD charged against each budget policy (once per policy).",
                                labels=("policy", "model", "provider")),
        )
