"""The spend ledger summed per model, key, team, policy, provider, endpoint, end user or session
(GET /v1/budget/usage).

Scoped like /v1/budget/status: the admin sees every row; a client key sees only the rows of its own
requests (so only its own end users and sessions), and grouped by policy only the policies that apply to
it. `requests` counts charged requests (a failed request costs nothing and is not counted); `cache_hits`
counts requests answered from the response cache and `saved_usd` what their answers cost when bought; a
row with several policies counts once in each of its policy groups and once in the total.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from gateway.budget.ledger_read import ledger_rows
from gateway.budget.status import visible_policies
from gateway.budget.store import LedgerEntry
from gateway.config.model import CallerIdentity, Settings
from gateway.domain.pricing import format_usd
from gateway.errors import InvalidRequest

__all__ = ["GROUPS", "Totals", "Scope", "ledger_rows", "usage_totals", "grouped_totals", "parse_instant", "GroupBy",
           "NOW_INCLUDED_S"]

GroupBy = Literal["model", "key", "team", "policy", "provider", "endpoint", "user", "session"]
GROUPS: tuple[GroupBy, ...] = ("model", "key", "team", "policy", "provider", "endpoint", "user", "session")
NOW_INCLUDED_S = 0.001   # the default `until` is exclusive: one ledger tick past now
MAX_INSTANT_S = 2**33    # epoch seconds (the year 2242): later times are refused, not overflowed
_FIELDS: dict[str, Callable[[LedgerEntry], str | None]] = {
    "model": lambda entry: entry.model, "key": lambda entry: entry.caller, "team": lambda entry: entry.team,
    "provider": lambda entry: entry.provider, "endpoint": lambda entry: entry.endpoint,
    "user": lambda entry: entry.user, "session": lambda entry: entry.session,
}


@dataclass
class Totals:
    """Sums over ledger rows."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cost_nano: int = 0
    cache_hits: int = 0
    saved_nano: int = 0

    def add(self, entry: LedgerEntry) -> None:
        """Count one row (a cache hit only as a hit and what it saved: it was not charged)."""
        if entry.status == "cache_hit":
            self.cache_hits += 1
            self.saved_nano += entry.saved_nano
            return
        self.requests += entry.status != "failed"
        self.prompt_tokens += entry.prompt_tokens
        self.completion_tokens += entry.completion_tokens
        self.cached_tokens += entry.cached_tokens
        self.cache_write_tokens += entry.cache_write_tokens
        self.cost_nano += entry.cost_nano

    def as_json(self) -> dict[str, Any]:
        """Token counts as integers, cost and savings as exact decimal strings of USD."""
        return {"requests": self.requests, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "cached_tokens": self.cached_tokens,
                "cache_write_tokens": self.cache_write_tokens, "cost_usd": format_usd(self.cost_nano), "cache_hits": self.cache_hits,
                "saved_usd": format_usd(self.saved_nano)}


@dataclass(frozen=True)
class Scope:
    """Which rows and policy groups a caller may see; None means all of them (the admin)."""

    caller: str | None
    policies: frozenset[str] | None

    @classmethod
    def of(cls, settings: Settings, caller: CallerIdentity) -> Scope:
        """The admin's scope, or a client's own rows and visible policies."""
        if caller.admin:
            return cls(None, None)
        return cls(caller.name, frozenset(p.name for p in visible_policies(settings, caller, None)))

    def sees(self, entry: LedgerEntry) -> bool:
        return self.caller is None or entry.caller == self.caller

    def groups(self, entry: LedgerEntry, group_by: GroupBy) -> list[str | None]:
        """The groups one row counts in."""
        if group_by == "policy":
            return [p for p in entry.policies if self.policies is None or p in self.policies]
        return [_FIELDS[group_by](entry)]


async def usage_totals(rows: AsyncIterator[LedgerEntry], scope: Scope,
                       group_by: GroupBy) -> tuple[dict[str | None, Totals], Totals]:
    """Totals per group and overall, over the rows `scope` sees."""
    groups, total = await grouped_totals(rows, scope, (group_by,))
    return groups[group_by], total


async def grouped_totals(rows: AsyncIterator[LedgerEntry], scope: Scope, group_bys: Sequence[GroupBy]
                         ) -> tuple[dict[GroupBy, dict[str | None, Totals]], Totals]:
    """Totals per group of each of `group_bys`, and overall, in one pass over the rows `scope` sees."""
    groups: dict[GroupBy, dict[str | None, Totals]] = {group_by: {} for group_by in group_bys}
    total = Totals()
    async for entry in rows:
        if not scope.sees(entry):
            continue
        total.add(entry)
        for group_by, totals in groups.items():
            for group in scope.groups(entry, group_by):
                totals.setdefault(group, Totals()).add(entry)
    return groups, total


def parse_instant(text: str, param: str) -> float:
    """Epoch seconds from epoch seconds or ISO 8601 (a time without an offset is UTC), 0 <= t < 2**33."""
    try:
        seconds = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise InvalidRequest(f"'{param}' must be an ISO 8601 time or epoch seconds.", param=param) from None
        seconds = (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()
    if not math.isfinite(seconds):
        raise InvalidRequest(f"'{param}' must be a finite time.", param=param)
    if not 0 <= seconds < MAX_INSTANT_S:
        raise InvalidRequest(f"'{param}' must be from 1970 to before {MAX_INSTANT_S} epoch seconds.", param=param)
    return seconds
