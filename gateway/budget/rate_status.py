"""Rate limit status: what each rate window and in-flight counter holds now, scoped to what a caller may see.

For `GET /v1/rate_limits/status` (gateway.http.rate_limits): one entry per limited unit of each window of the visible
policies, per `each` value (the admin sees every configured key, team or exactly-named routed model a
policy can count apart; a client sees its own), and for the admin each provider's own windows.
"""

from __future__ import annotations

from typing import Any

from gateway.budget.engine import BudgetEngine
from gateway.budget.each import each_values
from gateway.budget.rate_slots import PROVIDER_MARK
from gateway.budget.rate_windows import bucket_end, bucket_of, concurrent_counter, rate_counter, window_s
from gateway.budget.store import CounterKey, CounterState
from gateway.config.model import CallerIdentity, Policy, RateLimit, Settings

__all__ = ["rate_report"]

Row = tuple[dict[str, Any], CounterKey, RateLimit | None, int | None]


def _rows(settings: Settings, policies: list[Policy], caller: CallerIdentity, now: float) -> list[Row]:
    """(entry head, counter, limit) of every window and flight to report."""
    rows: list[Row] = []
    for policy in policies:
        for each in each_values(settings, policy, caller):
            head = {"policy": policy.name, "each": policy.each, "value": each}
            rows += [(head, rate_counter(policy.name, limit.per, now, each), limit, None)
                     for limit in policy.rate_limits]
            if policy.max_concurrent is not None:
                rows.append((head, concurrent_counter(policy.name, each), None, policy.max_concurrent))
    if caller.admin:
        for provider in settings.providers.values():
            rows += [({"provider": provider.name}, rate_counter(PROVIDER_MARK + provider.name, limit.per, now),
                      limit, None) for limit in provider.rate_limits]
    return rows


def _entries(head: dict[str, Any], state: CounterState, limit: RateLimit | None, flight: int | None,
             now: float) -> list[dict[str, Any]]:
    """One entry per limited unit of a window (or the one entry of a flight)."""
    if limit is None:
        assert flight is not None
        used = state.reserved.requests
        return [{**head, "per": "concurrent", "unit": "requests", "limit": flight, "used": used,
                 "remaining": max(0, flight - used), "utilization": round(used / flight, 6)}]
    resets = bucket_end(limit.per, bucket_of(limit.per, now)) + window_s(limit.per) - now
    entries = []
    for unit, cap, used in (("requests", limit.requests, state.spent.requests), ("tokens", limit.tokens,
                                                                                 state.spent.tokens)):
        if cap is not None:
            entries.append({**head, "per": limit.per, "unit": unit, "limit": cap, "used": used,
                            "remaining": max(0, cap - used), "utilization": round(used / cap, 6),
                            "empty_in_s": round(resets, 3) if used else 0})
    return entries


async def rate_report(engine: BudgetEngine, settings: Settings, policies: list[Policy], caller: CallerIdentity,
                      now: float) -> list[dict[str, Any]]:
    """Status entries of every visible rate window and flight, read in one store call."""
    await engine.settled()
    rows = _rows(settings, [p for p in policies if p.limits_rate], caller, now)
    if engine.store is None or not rows:
        return []
    states = await engine.store.read([counter for _, counter, _, _ in rows], now)
    return [entry for (head, _, limit, flight), state in zip(rows, states)
            for entry in _entries(head, state, limit, flight, now)]
