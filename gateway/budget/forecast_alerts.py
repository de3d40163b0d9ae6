"""Forecast alerts: a policy's webhook hears once per window when the spend projected at its reset passes
`forecast_alert` x its limit.

Checked off the request path every CHECK_S (and on demand: `check`), from the same status report as
`GET /v1/budget/status`; delivered through the budget alert path (`AlertSender.send`), so, like the
thresholds, an alert is claimed in the store under a key naming its window (once across replicas, at least
once while the window lasts). Per end user (`each: user`) windows are not alerted: a webhook per user
would drown the receiver.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from gateway.budget.alerts import AlertSender, Delivery
from gateway.budget.each import each_values
from gateway.budget.engine import BudgetEngine
from gateway.budget.rate_windows import with_each
from gateway.budget.status import budget_report
from gateway.budget.windows import window_for
from gateway.config.holder import ConfigHolder
from gateway.config.model import ADMIN_CALLER, Policy, Settings

__all__ = ["CHECK_S", "ForecastAlerts", "forecast_text"]

CHECK_S = 60.0
SEEN_MAX = 10_000


class ForecastAlerts:
    """Finds windows whose projection passes their policy's `forecast_alert` and queues one alert each."""

    def __init__(self, engine: BudgetEngine, config: ConfigHolder, sender: AlertSender) -> None:
        self._engine = engine
        self._config = config
        self._sender = sender
        self._seen: set[str] = set()

    async def check(self) -> int:
        """Queue the alerts of windows newly projected past their share; how many were queued."""
        settings = self._config.current
        policies = [p for p in settings.policies if p.forecast_alert is not None and p.alerts is not None
                    and p.each != "user"]
        if not policies:
            return 0
        now = self._engine.clock.now()
        entries = await budget_report(self._engine, policies, now,
                                      lambda policy: each_values(settings, policy, ADMIN_CALLER), settings)
        queued = 0
        for entry in entries:
            policy = settings.policy_index[entry["policy"]]
            key = _key(policy, entry, now)
            if key in self._seen or not _passes(policy, entry):
                continue
            if len(self._seen) >= SEEN_MAX:
                self._seen.clear()
            self._seen.add(key)
            queued += self._send(settings, policy, key, entry, now)
        return queued

    def _send(self, settings: Settings, policy: Policy, key: str, entry: dict[str, Any], now: float) -> bool:
        assert policy.alerts is not None
        field = "content" if policy.alerts.format == "discord" else "text"
        resets_at = window_for(entry["period"], policy.timezone, now).end_ts
        delivery = Delivery(key, policy.name, {field: forecast_text(policy, entry)}, resets_at)
        if self._sender.send(policy.alerts.webhook, delivery):
            return True
        self._seen.discard(key)                      # its queue was full: the next check offers it again
        return False


def _passes(policy: Policy, entry: dict[str, Any]) -> bool:
    """True when the projection at the reset is at or above the policy's share of the limit."""
    assert policy.forecast_alert is not None
    projected = Decimal(str(entry["forecast"]["projected_at_reset"]))
    return projected >= policy.forecast_alert * Decimal(str(entry["limit"]))


def _key(policy: Policy, entry: dict[str, Any], now: float) -> str:
    """policy:period:window[@value]:forecast, the same on every replica (one alert per window)."""
    window = window_for(entry["period"], policy.timezone, now).id
    return f"{policy.name}:{entry['period']}:{with_each(window, entry.get('value'))}:forecast"


def forecast_text(policy: Policy, entry: dict[str, Any]) -> str:
    """The human message of a forecast alert (never a key or a caller; an `each` value names the counter)."""
    ahead, unit = entry["forecast"], entry["unit"]
    suffix = " USD" if unit == "usd" else f" {unit}"
    who = f" for {entry['each']} '{entry['value']}'" if entry.get("each") else ""
    runs_out = f"; at that rate it runs out at {ahead['exhausted_at']}" if ahead["exhausted_at"] else ""
    share = f"{(policy.forecast_alert or Decimal(1)) * 100:f}".rstrip("0").rstrip(".")
    return (f"Budget forecast: policy '{policy.name}' {entry['period']} budget{who} is projected to reach "
            f"{ahead['projected_at_reset']}{suffix} of its {entry['limit']}{suffix} limit ({share}% alert) by the "
            f"reset at {entry['resets_at']}, spending {ahead['burn_per_hour']}{suffix} an hour{runs_out}.")
