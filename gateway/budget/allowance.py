"""Fail-open: while the store is unreachable, each replica spends at most a share of every limit.

With R replicas the overshoot of any limit is therefore at most R x share x limit. A rate window's share
counts for the whole outage (not per bucket), an in-flight share until the request ends; providers' own
rate limits (optional line groups) are not enforced meanwhile.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.budget.rate_windows import kind_of, split_each
from gateway.budget.store import CounterKey, ReserveLine
from gateway.domain.pricing import Charge

__all__ = ["LocalAllowance"]


def _local(counter: CounterKey) -> CounterKey:
    """The allowance's counter of a line: a rate window's without its bucket."""
    if kind_of(counter) != "rate":
        return counter
    return counter._replace(window_id=split_each(counter.window_id)[1])


def _scaled(limit: int | None, share: float) -> int | None:
    return None if limit is None else int(limit * share)


class LocalAllowance:
    """This replica's blind spending during a store outage, per counter."""

    def __init__(self, share: float) -> None:
        self.share = share
        self._used: dict[CounterKey, Charge] = {}

    def try_take(self, lines: Sequence[ReserveLine]) -> bool:
        """Take every line's amount from the allowance, or nothing when one would not fit."""
        lines = [line for line in lines if not line.group]
        for line in lines:
            used = self._used.get(_local(line.counter), Charge()) + line.amount
            caps = [_scaled(limit, self.share) for limit in line.limits]
            if any(cap is not None and value > cap
                   for cap, value in zip(caps, (used.usd_nano, used.tokens, used.requests))):
                return False
        for line in lines:
            self._used[_local(line.counter)] = self._used.get(_local(line.counter), Charge()) + line.amount
        return True

    def adjust(self, lines: Sequence[ReserveLine], actual: Charge | None) -> None:
        """Replace what `lines` took by the actual charge (None gives it all back)."""
        for line in lines:
            if line.group:
                continue
            counter = _local(line.counter)
            used = self._used.get(counter, Charge())
            spent = actual if actual is not None and kind_of(counter) != "concurrent" else Charge()
            self._used[counter] = Charge(
                max(0, used.usd_nano - line.amount.usd_nano + spent.usd_nano),
                max(0, used.tokens - line.amount.tokens + spent.tokens),
                max(0, used.requests - line.amount.requests + spent.requests))

    def clear(self) -> None:
        """Forget local spend once the store holds it again."""
        self._used.clear()
