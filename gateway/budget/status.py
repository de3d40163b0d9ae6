"""Budget status: how much is left in every window, and until when; scoped to what a caller may see."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

from gateway.budget.burn import HOUR_S
from gateway.budget.engine import BudgetEngine, limits_of
from gateway.budget.forecast import Forecast, forecast
from gateway.budget.matching import applies_to_caller
from gateway.budget.rate_windows import with_each
from gateway.budget.store import UNITS, CounterKey, CounterState
from gateway.budget.windows import window_for
from gateway.config.model import CallerIdentity, Policy, Settings
from gateway.domain.pricing import Charge, format_usd
from gateway.errors import NotFound

__all__ = ["visible_policies", "budget_report", "window_entries"]


def visible_policies(settings: Settings, caller: CallerIdentity, name: str | None) -> list[Policy]:
    """The admin sees every policy; a client only those that apply to it. Others look nonexistent."""
    policies = [p for p in settings.policies if caller.admin or applies_to_caller(p, caller)]
    if name is None:
        return policies
    found = [p for p in policies if p.name == name]
    if not found:
        raise NotFound(f"No budget policy named '{name}'.", code="policy_not_found", param="policy")
    return found


def _amount(unit: str, value: int) -> int | str:
    """USD as an exact decimal string, other units as integers."""
    return format_usd(value) if unit == "usd" else value


def _state(spent: int, limit: int, warn_at: tuple[Decimal, ...]) -> str:
    if spent >= limit:
        return "exceeded"
    return "warning" if warn_at and Decimal(spent) >= min(warn_at) * limit else "ok"


def window_entries(policy: Policy, state: CounterState, budget_index: int, now: float,
                   burned: Charge | None = None) -> list[dict[str, Any]]:
    """One status entry per limited unit of one budget window (with its forecast when `burned`, what the window
    was charged in the last hour, is known)."""
    budget = policy.budgets[budget_index]
    window = window_for(budget.period, policy.timezone, now)
    entries = []
    last_hour = _units(burned or Charge())
    for unit, limit, spent, reserved, hour in zip(UNITS, limits_of(budget), _units(state.spent),
                                                  _units(state.reserved), last_hour):
        if limit is None:
            continue
        entry: dict[str, Any] = {
            "policy": policy.name, "period": budget.period, "unit": unit,
            "limit": _amount(unit, limit), "spent": _amount(unit, spent), "reserved": _amount(unit, reserved),
            "remaining": _amount(unit, max(0, limit - spent - reserved)),
            "utilization": round(spent / limit, 6) if limit else 1.0,
            "window_start": window.start.isoformat(), "resets_at": window.end.isoformat(),
            "timezone": policy.timezone, "state": _state(spent, limit, policy.warn_at),
        }
        if burned is not None:
            entry["forecast"] = forecast_json(unit, forecast(spent, limit, window.start_ts, window.end_ts, now, hour))
        entries.append(entry)
    return entries


def forecast_json(unit: str, ahead: Forecast) -> dict[str, Any]:
    """A forecast in the window's unit: USD as exact decimal strings (to the nano-USD), counts as numbers."""
    def amount(value: float) -> int | float | str:
        return format_usd(round(value)) if unit == "usd" else round(value, 3)
    return {"burn_per_hour": amount(ahead.burn_per_hour), "burn_per_hour_window": amount(ahead.burn_per_hour_window),
            "projected_at_reset": amount(ahead.projected_at_reset), "exhausted_at": ahead.exhausted_iso()}


def _units(charge: Charge) -> tuple[int, int, int]:
    return charge.usd_nano, charge.tokens, charge.requests


async def budget_report(engine: BudgetEngine, policies: list[Policy], now: float,
                        values: EachValues | None = None, settings: Settings | None = None) -> list[dict[str, Any]]:
    """Status entries of every budget window of `policies`, read in one store call.

    A policy with `each` reports one window per value `values` gives it (without `values`, none: a
    metric cannot be labelled per key). Settlements of requests this replica has answered are waited
    for first: a caller reads its own spend. With `settings` (every policy, for the burn rates), each
    entry has its `forecast` (gateway.budget.forecast), from the ledger rows new since the last report.
    """
    await engine.settled()
    slots = [(p, i, value, CounterKey(p.name, b.period, with_each(window_for(b.period, p.timezone, now).id, value)))
             for p in policies for value in _values(p, values) for i, b in enumerate(p.budgets)]
    if engine.store is None or not slots:
        return []
    states = await engine.store.read([counter for _, _, _, counter in slots], now)
    if settings is not None:
        await engine.burn.refresh(engine.store, settings.policy_index, now)
    return [{**entry, "each": policy.each, "value": value} if policy.each else entry
            for (policy, index, value, _), state in zip(slots, states)
            for entry in window_entries(policy, state, index, now,
                                        _burned(engine, policy, index, value, now) if settings else None)]


def _burned(engine: BudgetEngine, policy: Policy, index: int, value: str | None, now: float) -> Charge:
    """What the window was charged in the last hour, or since it started when that is nearer."""
    window = window_for(policy.budgets[index].period, policy.timezone, now)
    return engine.burn.spent_since(policy.name, value, max(now - HOUR_S, window.start_ts))


EachValues = Callable[[Policy], list[str | None]]


def _values(policy: Policy, values: EachValues | None) -> list[str | None]:
    if policy.each is None:
        return [None]
    return values(policy) if values is not None else []
