"""Budget status: how much is left in every window, and until when; scoped to what a caller may see."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

from gateway.budget.engine import BudgetEngine, limits_of
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


def window_entries(policy: Policy, state: CounterState, budget_index: int, now: float) -> list[dict[str, Any]]:
    """One status entry per limited unit of one budget window."""
    budget = policy.budgets[budget_index]
    window = window_for(budget.period, policy.timezone, now)
    entries = []
    for unit, limit, spent, reserved in zip(UNITS, limits_of(budget), _units(state.spent), _units(state.reserved)):
        if limit is None:
            continue
        entries.append({
            "policy": policy.name, "period": budget.period, "unit": unit,
            "limit": _amount(unit, limit), "spent": _amount(unit, spent), "reserved": _amount(unit, reserved),
            "remaining": _amount(unit, max(0, limit - spent - reserved)),
            "utilization": round(spent / limit, 6) if limit else 1.0,
            "window_start": window.start.isoformat(), "resets_at": window.end.isoformat(),
            "timezone": policy.timezone, "state": _state(spent, limit, policy.warn_at),
        })
    return entries


def _units(charge: Charge) -> tuple[int, int, int]:
    return charge.usd_nano, charge.tokens, charge.requests


async def budget_report(engine: BudgetEngine, policies: list[Policy], now: float,
                        values: EachValues | None = None) -> list[dict[str, Any]]:
    """Status entries of every budget window of `policies`, read in one store call.

    A policy with `each` reports one window per value `values` gives it (without `values`, none: a
    metric cannot be labelled per key). Settlements of requests this replica has answered are waited
    for first: a caller reads its own spend.
    """
    await engine.settled()
    slots = [(p, i, value, CounterKey(p.name, b.period, with_each(window_for(b.period, p.timezone, now).id, value)))
             for p in policies for value in _values(p, values) for i, b in enumerate(p.budgets)]
    if engine.store is None or not slots:
        return []
    states = await engine.store.read([counter for _, _, _, counter in slots], now)
    return [{**entry, "each": policy.each, "value": value} if policy.each else entry
            for (policy, index, value, _), state in zip(slots, states)
            for entry in window_entries(policy, state, index, now)]


EachValues = Callable[[Policy], list[str | None]]


def _values(policy: Policy, values: EachValues | None) -> list[str | None]:
    if policy.each is None:
        return [None]
    return values(policy) if values is not None else []
