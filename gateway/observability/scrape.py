"""What `/metrics` reads at scrape time: budget windows from the store, breaker states, config reloads.

Budget gauges come from the shared store, so every replica reports the same truth; they are absent
from a scrape whose store read failed (and `gateway_store_errors_total{operation="read"}` goes up).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.background import BackgroundFailures
from gateway.budget.engine import BudgetEngine
from gateway.budget.status import budget_report
from gateway.config.model import Settings
from gateway.config.reload import ConfigReloader
from gateway.errors import StoreError
from gateway.observability.instruments import GatewayMetrics
from gateway.resilience.registry import ResilienceRegistry

__all__ = ["BREAKER_STATES", "STORE_READ_TIMEOUT_S", "Scrape", "read_budgets", "budget_families", "forecast_families",
           "breaker_family", "reload_family", "background_family", "BACKGROUND_TASKS"]

BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}
STORE_READ_TIMEOUT_S = 2.0
_BUDGET_LABELS = ("policy", "period", "unit")
BACKGROUND_TASKS = ("config_reload", "alert_delivery", "journal_replay", "spare_reservations", "accept_connections",
                    "header_deadlines", "canary_sync", "forecast_alerts")


class Scrape(Collector):
    """The families of one scrape: the processes' own, then those read for it from the store."""

    def __init__(self, families: Iterable[Metric], read: Iterable[Metric]) -> None:
        self.families = [*families, *read]

    def collect(self) -> Iterable[Metric]:
        yield from self.families


async def read_budgets(engine: BudgetEngine, settings: Settings, metrics: GatewayMetrics) -> list[Metric]:
    """Budget gauges of every policy window, in one store read; none when the read fails."""
    try:
        async with asyncio.timeout(STORE_READ_TIMEOUT_S):
            entries = await budget_report(engine, list(settings.policies), engine.clock.now(), settings=settings)
    except TimeoutError:
        metrics.store_errors("read").inc()   # the instrumented store saw a cancellation, not an error
        return []
    except StoreError:
        return []                            # already counted by the instrumented store
    return budget_families(entries)


def budget_families(entries: Iterable[dict[str, Any]]) -> list[Metric]:
    """Spent, limit and utilization gauges from budget status entries (USD, tokens or requests)."""
    spent = GaugeMetricFamily("gateway_budget_spent", "Spent in the current budget window, in the unit.",
                              labels=_BUDGET_LABELS)
    limit = GaugeMetricFamily("gateway_budget_limit", "Limit of the current budget window, in the unit.",
                              labels=_BUDGET_LABELS)
    utilization = GaugeMetricFamily("gateway_budget_utilization", "Spent over limit in the current window.",
                                    labels=_BUDGET_LABELS)
    for entry in entries:
        labels = [entry["policy"], entry["period"], entry["unit"]]
        spent.add_metric(labels, float(entry["spent"]))
        limit.add_metric(labels, float(entry["limit"]))
        utilization.add_metric(labels, float(entry["utilization"]))
    return [spent, limit, utilization, *forecast_families(entries)]


def forecast_families(entries: Iterable[dict[str, Any]]) -> list[Metric]:
    """Burn rate, projected spend at the reset and its share of the limit, per shared budget window."""
    burn = GaugeMetricFamily("gateway_budget_burn_per_hour", "Spent in the last hour (per hour), in the unit.",
                             labels=_BUDGET_LABELS)
    projected = GaugeMetricFamily("gateway_budget_projected_at_reset",
                                  "Spend projected at the window's reset at the last hour's rate, in the unit.",
                                  labels=_BUDGET_LABELS)
    share = GaugeMetricFamily("gateway_budget_projected_utilization",
                              "Projected spend at the reset over the limit (1 = runs out right at the reset).",
                              labels=_BUDGET_LABELS)
    for entry in entries:
        ahead = entry.get("forecast")
        if ahead is None:
            continue
        labels = [entry["policy"], entry["period"], entry["unit"]]
        burn.add_metric(labels, float(ahead["burn_per_hour"]))
        projected.add_metric(labels, float(ahead["projected_at_reset"]))
        limit = float(entry["limit"])
        share.add_metric(labels, float(ahead["projected_at_reset"]) / limit if limit else 1.0)
    return [burn, projected, share]


def breaker_family(resilience: ResilienceRegistry, settings: Settings) -> Metric:
    """Each configured provider's breaker state: 0 closed, 1 half_open, 2 open."""
    family = GaugeMetricFamily("gateway_breaker_state", "Circuit breaker state: 0 closed, 1 half_open, 2 open.",
                               labels=("provider",))
    for entry in resilience.snapshot():
        if entry["provider"] in settings.providers:
            family.add_metric([entry["provider"]], BREAKER_STATES[entry["state"]])
    return family


def reload_family(reloader: ConfigReloader | None) -> Metric:
    """Config reloads by result (zero when the config is not watched)."""
    family = CounterMetricFamily("gateway_config_reloads", "Config reloads by result.", labels=("result",))
    results = reloader.results if reloader is not None else {"success": 0, "failure": 0}
    for result, count in results.items():
        family.add_metric([result], count)
    return family


def background_family(failures: BackgroundFailures) -> Metric:
    """Failures of long-lived background tasks, by task (each task keeps running after one)."""
    family = CounterMetricFamily("gateway_background_failures",
                                 "Exceptions caught in long-lived background tasks, which keep running.",
                                 labels=("task",))
    for task in sorted({*BACKGROUND_TASKS, *failures.counts}):
        family.add_metric([task], failures.counts.get(task, 0))
    return family
