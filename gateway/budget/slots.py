"""The budget windows a request reserves on: its matching policies' budgets in the current windows.

What a request matches depends only on the Settings, the caller and the model, and the windows only
on the clock, so `SlotCache` keeps both per (caller, model): the policies until a reload swaps the
Settings, their slots until `now` leaves one of the slots' windows. A request then only adds its
amount to each slot (`BudgetSlot.line`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.budget.matching import matching_policies
from gateway.budget.store import CounterKey, Limits, ReserveLine
from gateway.budget.windows import Window, WindowCache
from gateway.config.model import BudgetLimit, CallerIdentity, Policy, Settings
from gateway.domain.pricing import Charge, usd_to_nano

__all__ = ["KEY_GRACE_S", "BudgetSlot", "Match", "SlotCache", "budget_slots", "limits_of"]

KEY_GRACE_S = 35 * 86_400   # counters outlive their window long enough for last month's report
MAX_MATCHES = 4096          # (caller, model) pairs kept; more are dropped together and found again


def limits_of(budget: BudgetLimit) -> Limits:
    """A budget's limits in store units (nano-USD, tokens, requests)."""
    return (None if budget.usd is None else usd_to_nano(budget.usd), budget.tokens, budget.requests)


@dataclass(frozen=True)
class BudgetSlot:
    """One window of one policy budget: a reserve line without its amount, and where it came from."""

    counter: CounterKey
    limits: Limits
    expires_at: float
    policy: Policy
    window: Window

    def line(self, amount: Charge) -> ReserveLine:
        """The reserve line of a request holding `amount` on this slot."""
        return ReserveLine(self.counter, amount, self.limits, self.expires_at)


def budget_slots(policies: Sequence[Policy], now: float, windows: WindowCache) -> tuple[BudgetSlot, ...]:
    """One slot per policy budget, in the windows holding `now`."""
    slots = []
    for policy in policies:
        for budget in policy.budgets:
            window = windows.window_for(budget.period, policy.timezone, now)
            slots.append(BudgetSlot(CounterKey(policy.name, budget.period, window.id), limits_of(budget),
                                    window.end_ts + KEY_GRACE_S, policy, window))
    return tuple(slots)


class Match:
    """The policies a (caller, model) pair must fit, and their slots while `now` is in [since, until)."""

    __slots__ = ("policies", "names", "slots", "since", "until")

    def __init__(self, policies: list[Policy]) -> None:
        self.policies = policies
        self.names = tuple(dict.fromkeys(policy.name for policy in policies if policy.budgets))
        self.slots: tuple[BudgetSlot, ...] = ()
        self.since = self.until = 0.0


class SlotCache:
    """Matching policies per (caller, model) for one Settings, and their budget slots per window."""

    def __init__(self) -> None:
        self._settings: Settings | None = None
        self._matches: dict[tuple[CallerIdentity, str], Match] = {}
        self._windows = WindowCache()

    def match(self, settings: Settings, caller: CallerIdentity, model: str) -> Match:
        """What a request by `caller` for `model` must fit under `settings`."""
        if settings is not self._settings or len(self._matches) >= MAX_MATCHES:
            self._settings, self._matches = settings, {}
        match = self._matches.get((caller, model))
        if match is None:
            match = self._matches[(caller, model)] = Match(matching_policies(settings.policies, caller, model))
        return match

    def slots(self, match: Match, now: float) -> tuple[BudgetSlot, ...]:
        """The match's slots in the windows holding `now`."""
        if not match.since <= now < match.until:
            match.slots = budget_slots(match.policies, now, self._windows)
            windows = [slot.window for slot in match.slots]
            match.since = max((w.start_ts for w in windows), default=now)
            match.until = min((w.end_ts for w in windows), default=now)
        return match.slots
