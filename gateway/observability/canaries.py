"""Routing metrics: requests per route arm (counted in process), and each canary's state read from the store.

The arm is a bounded label: a split's provider, `control` or `candidate`, or an `auto` rule's model, all from
the config. Canary gauges are read from the shared store at scrape, like budgets, so every replica reports
the same step and figures; they are absent from a scrape whose store read failed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.budget.canary_record import STATUSES
from gateway.config.model import Settings
from gateway.errors import StoreError
from gateway.routing.canary import figures, percent
from gateway.routing.canary_runs import CanaryRuns
from gateway.routing.router import CANDIDATE, CONTROL, ArmCounts

__all__ = ["ArmCollector", "read_canaries", "CANARY_STATES"]

CANARY_STATES = {status: index for index, status in enumerate(STATUSES)}   # ramping 0, promoted 1, rolled_back 2
_READ_TIMEOUT_S = 2.0
_NANO_PER_USD = 1_000_000_000


class ArmCollector(Collector):
    """`gateway_route_arm_requests_total`: requests sent down each arm of split, canary and rules routes."""

    def __init__(self, counts: ArmCounts) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        """The counts as one counter family."""
        family = CounterMetricFamily("gateway_route_arm_requests", "Requests routed down each arm of a split "
                                     "(provider), canary (control, candidate) or rules (model) route.",
                                     labels=("route", "arm"))
        for (route, arm), count in list(self._counts.items()):
            family.add_metric([route, arm], count)
        yield family


async def read_canaries(runs: CanaryRuns, settings: Settings) -> list[Metric]:
    """Each canary's state, step share and arm figures, read from the store; none when the read fails."""
    try:
        async with asyncio.timeout(_READ_TIMEOUT_S):
            read = await runs.read(settings)
    except (StoreError, TimeoutError):
        return []
    state = GaugeMetricFamily("gateway_canary_state", "Canary state: 0 ramping, 1 promoted, 2 rolled_back.",
                              labels=("route",))
    share = GaugeMetricFamily("gateway_canary_candidate_percent", "Percent of requests the canary sends to "
                              "its candidate.", labels=("route",))
    arms = [GaugeMetricFamily(name, text, labels=("route", "arm")) for name, text in (
        ("gateway_canary_arm_requests", "Requests of each canary arm in the current step."),
        ("gateway_canary_arm_error_rate", "Share of failed requests of each canary arm in the current step."),
        ("gateway_canary_arm_p95_latency_seconds", "p95 latency of each canary arm's answers in the step."),
        ("gateway_canary_arm_cost_per_request_usd", "USD per answer of each canary arm in the step."))]
    for run, record in read:
        state.add_metric([run.route], CANARY_STATES[record.status])
        share.add_metric([run.route], percent(run.config, record))
        for arm, tally in zip((CONTROL, CANDIDATE), record.arms):
            arm_figures = figures(tally)
            cost = arm_figures.cost_per_request_nano
            values = (arm_figures.requests, arm_figures.error_rate, arm_figures.p95_latency_s,
                      None if cost is None else cost / _NANO_PER_USD)
            for family, value in zip(arms, values):
                if value is not None:
                    family.add_metric([run.route, arm], value)
    return [state, share, *arms]
