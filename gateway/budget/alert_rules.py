"""Which budget alerts a settled counter has reached, and what each one says.

A policy window reaches a threshold when its fullest limited unit (spent / limit) is at or above it;
the thresholds are the policy's `warn_at` shares and 1 (exceeded). Messages name the policy, period,
threshold, spent, limit and reset time: never a key or a caller.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from fractions import Fraction
from typing import Any

from gateway.budget.engine import limits_of
from gateway.budget.rate_windows import split_each
from gateway.budget.store import UNITS, CounterState, Unit
from gateway.budget.windows import window_for
from gateway.config.model import AlertConfig, BudgetLimit, Policy
from gateway.domain.pricing import format_usd

__all__ = ["EXCEEDED", "Alert", "reached_alerts", "alert_text", "webhook_payload"]

EXCEEDED = Decimal(1)


@dataclass(frozen=True)
class Alert:
    """One policy window at or above one threshold; `key` identifies it across replicas."""

    policy: str
    period: str
    window_id: str
    threshold: Decimal
    unit: Unit
    spent: int
    limit: int
    resets_at: datetime
    target: AlertConfig

    @property
    def key(self) -> str:
        """policy:period:window:threshold, the same on every replica."""
        return f"{self.policy}:{self.period}:{self.window_id}:{self.threshold}"


def reached_alerts(policy: Policy, state: CounterState, now: float) -> list[Alert]:
    """Every threshold the counter's window has reached, lowest first; none once that window is over."""
    budget = next((b for b in policy.budgets if b.period == state.counter.period), None)
    if policy.alerts is None or budget is None:
        return []
    window = window_for(budget.period, policy.timezone, now)
    fullest = _fullest_unit(budget, state)
    if window.id != split_each(state.counter.window_id)[0] or fullest is None:
        return []
    unit, spent, limit = fullest
    used = Fraction(spent, limit) if limit else Fraction(1)
    thresholds = sorted({*policy.warn_at, EXCEEDED})
    # the counter's window id names its `each` value too: every key (team, model) is alerted on its own
    return [Alert(policy.name, budget.period, state.counter.window_id, threshold, unit, spent, limit, window.end,
                  policy.alerts)
            for threshold in thresholds if used >= threshold]


def _fullest_unit(budget: BudgetLimit, state: CounterState) -> tuple[Unit, int, int] | None:
    """The limited unit with the highest spent / limit, with its spent and limit."""
    spent = (state.spent.usd_nano, state.spent.tokens, state.spent.requests)
    limited = [(unit, used, limit) for unit, used, limit in zip(UNITS, spent, limits_of(budget))
               if limit is not None]
    return max(limited, key=lambda item: Fraction(item[1], item[2]) if item[2] else Fraction(1), default=None)


def alert_text(alert: Alert) -> str:
    """The human message of an alert."""
    spent, limit = _amount(alert.unit, alert.spent), _amount(alert.unit, alert.limit)
    share = f"{(alert.threshold * 100).normalize():f}%"
    title = "Budget exceeded" if alert.threshold >= EXCEEDED else "Budget warning"
    return (f"{title}: policy '{alert.policy}' {alert.period} budget reached its {share} threshold: "
            f"spent {spent} of its {limit} limit; the window resets at {alert.resets_at.isoformat()}.")


def webhook_payload(alert: Alert) -> dict[str, Any]:
    """The JSON body for the alert's webhook: Slack's {"text"} or Discord's {"content"}."""
    field = "content" if alert.target.format == "discord" else "text"
    return {field: alert_text(alert)}


def _amount(unit: Unit, value: int) -> str:
    return f"{format_usd(value)} USD" if unit == "usd" else f"{value} {unit}"
