"""What each budget counter spent in the last hour, from the spend ledger, each row read once per replica.

`BurnTracker.refresh` reads the ledger rows filed since its last read (and the few seconds before it, for
rows another replica filed a moment late), and adds each row to a one-minute bucket per (policy, `each`
value) it was charged to. `spent_since` sums a counter's buckets from a time within the last hour. So a
status read or a scrape costs the rows new since the last one, and memory holds at most 60 buckets per
(policy, value) active in the last hour. Every replica reads the same ledger, so they agree.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from gateway.budget.store import BudgetStore, LedgerEntry
from gateway.budget.ledger_read import ledger_rows
from gateway.budget.user_slots import ANONYMOUS
from gateway.config.model import Policy
from gateway.domain.pricing import Charge

__all__ = ["HOUR_S", "BurnTracker", "counted_value"]

HOUR_S = 3_600.0
LATE_S = 5.0          # rows filed up to this late (another replica's settlement) are still counted
_CHARGED = frozenset({"served", "lease_expired"})


def counted_value(policy: Policy, entry: LedgerEntry) -> str | None:
    """The `each` value a ledger row was charged under in `policy` (None: the shared counter)."""
    each = policy.each
    if each is None:
        return None
    if each == "key":
        return entry.caller
    if each == "team":
        return entry.team or ""
    if each == "model":
        return entry.requested_model or entry.model
    return entry.user or ANONYMOUS


class BurnTracker:
    """One-minute buckets of the last hour's spend per (policy, `each` value), kept from the ledger."""

    def __init__(self) -> None:
        self._buckets: dict[tuple[str, str | None], dict[int, Charge]] = {}
        self._read_until: float | None = None
        self._late: dict[str, float] = {}      # request ids read within LATE_S of the last read
        self._lock = asyncio.Lock()

    async def refresh(self, store: BudgetStore, policies: Mapping[str, Policy], now: float) -> None:
        """Read the ledger rows filed since the last refresh (the last hour at first)."""
        async with self._lock:
            since = now - HOUR_S if self._read_until is None else max(now - HOUR_S, self._read_until - LATE_S)
            async for entry in ledger_rows(store, since, now):
                if entry.request_id not in self._late and entry.status in _CHARGED:
                    self._add(entry, policies)
                if entry.time >= now - LATE_S:
                    self._late[entry.request_id] = entry.time
            self._read_until = now
            self._forget(now)

    def spent_since(self, policy: str, value: str | None, since: float) -> Charge:
        """What the counter of `policy` (and `value`) was charged in the minutes from `since` (within the hour)."""
        first = int(since // 60)
        total = Charge()
        for minute, charge in self._buckets.get((policy, value), {}).items():
            if minute >= first:
                total += charge
        return total

    def _add(self, entry: LedgerEntry, policies: Mapping[str, Policy]) -> None:
        charge = Charge(entry.cost_nano, entry.prompt_tokens + entry.completion_tokens, 1)
        minute = int(entry.time // 60)
        for name in entry.policies:
            policy = policies.get(name)
            if policy is not None and policy.budgets:
                buckets = self._buckets.setdefault((name, counted_value(policy, entry)), {})
                buckets[minute] = buckets.get(minute, Charge()) + charge

    def _forget(self, now: float) -> None:
        """Drop buckets older than the hour, and late-row ids older than LATE_S."""
        oldest = int((now - HOUR_S) // 60)
        for key in list(self._buckets):
            buckets = self._buckets[key]
            for minute in [m for m in buckets if m < oldest]:
                del buckets[minute]
            if not buckets:
                del self._buckets[key]
        self._late = {rid: at for rid, at in self._late.items() if at >= now - LATE_S}
