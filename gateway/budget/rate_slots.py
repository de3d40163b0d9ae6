"""The rate windows and requests-in-flight counters a request reserves on, beside its budget windows.

A matching policy's `rate_limits` give one slot per window and its `max_concurrent` one in-flight slot,
all of them per `each` value when the policy has one. Each target provider with `rate_limits` gives one
optional group of slots (group = the target's position + 1): the store reserves a group only while all
its windows have room, and the dispatcher skips the providers whose group did not fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gateway.budget.rate_windows import (
    BUCKETS, bucket_end, bucket_ms, bucket_of, concurrent_counter, epoch_of, rate_counter, window_s,
)
from gateway.budget.store import CounterKey, Limits, ReserveLine
from gateway.config.model import CallerIdentity, Policy, ProviderConfig, RateLimit
from gateway.domain.pricing import Charge

__all__ = ["RateSlot", "each_value", "rate_slots", "provider_slots", "PROVIDER_MARK", "FLIGHT_REFRESH_S"]

PROVIDER_MARK = "~"          # provider counters are named "~<provider>" (no policy name holds a '~')
FLIGHT_REFRESH_S = 60.0      # an in-flight slot is made again this often, so its counter's expiry stays ahead


@dataclass(frozen=True, slots=True)
class RateSlot:
    """One rate window (or in-flight counter) of one policy or provider: a reserve line without its amount."""

    counter: CounterKey
    limits: Limits
    expires_at: float
    until: float                  # the slot is made again once `now` reaches this (its bucket ends)
    policy: Policy | None = None  # None: a provider's own limit
    provider: str | None = None
    limit: RateLimit | None = None   # None: max_concurrent
    group: int = 0

    def line(self, amount: Charge) -> ReserveLine:
        """The reserve line of a request holding `amount` on this slot."""
        return ReserveLine(self.counter, amount, self.limits, self.expires_at, self.group)

    @property
    def kind(self) -> str:
        """`rate` or `concurrent`."""
        return "concurrent" if self.limit is None else "rate"

    def resets_in(self, now: float) -> float:
        """Seconds until what this window holds now has all left it."""
        assert self.limit is not None
        return bucket_end(self.limit.per, bucket_of(self.limit.per, now)) + window_s(self.limit.per) - now


def each_value(policy: Policy, caller: CallerIdentity, model: str) -> str | None:
    """The value a policy counts apart: the caller's key name, team or the model; None when shared (and for
    `each: user`, whose counters are named per request: gateway.budget.user_slots)."""
    if policy.each == "key":
        return caller.name
    if policy.each == "team":
        return caller.team or ""
    return model if policy.each == "model" else None


def _window_slot(name: str, limit: RateLimit, now: float, each: str | None, **where: object) -> RateSlot:
    counter = rate_counter(name, limit.per, now, each)
    bucket = bucket_of(limit.per, now)
    size_s = bucket_ms(limit.per) / 1000
    expires_at = (epoch_of(bucket) + 3) * BUCKETS * size_s     # no window reaches its epoch any more
    return RateSlot(counter, (None, limit.tokens, limit.requests), expires_at, bucket_end(limit.per, bucket),
                    limit=limit, **where)  # type: ignore[arg-type]


def rate_slots(policies: Sequence[Policy], caller: CallerIdentity, model: str, now: float,
               lease_s: float) -> list[RateSlot]:
    """The rate and in-flight slots of the policies that have them, in the windows holding `now`."""
    slots = []
    for policy in policies:
        each = each_value(policy, caller, model)
        for limit in policy.rate_limits:
            slots.append(_window_slot(policy.name, limit, now, each, policy=policy))
        if policy.max_concurrent is not None:
            # it outlives the lease of every request holding it (see FLIGHT_REFRESH_S)
            slots.append(RateSlot(concurrent_counter(policy.name, each), (None, None, policy.max_concurrent),
                                  now + lease_s + 2 * FLIGHT_REFRESH_S, now + FLIGHT_REFRESH_S, policy=policy))
    return slots


def provider_slots(providers: Sequence[ProviderConfig], now: float) -> list[RateSlot]:
    """One optional group per target provider with rate limits (group = its target position + 1)."""
    return [_window_slot(PROVIDER_MARK + provider.name, limit, now, None, provider=provider.name, group=index + 1)
            for index, provider in enumerate(providers) for limit in provider.rate_limits]
