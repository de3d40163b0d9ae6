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
from gateway.budget.rate_slots import RateSlot, each_value, provider_slots, rate_slots
from gateway.budget.rate_windows import with_each
from gateway.budget.store import CounterKey, Limits, ReserveLine
from gateway.budget.user_slots import user_slots
from gateway.budget.windows import Window, WindowCache
from gateway.config.model import BudgetLimit, CallerIdentity, Policy, ProviderConfig, Settings
from gateway.domain.plan import Plan
from gateway.domain.pricing import Charge, usd_to_nano

__all__ = ["KEY_GRACE_S", "BudgetSlot", "Slot", "Match", "SlotCache", "budget_slots", "limits_of", "hit_slots"]

KEY_GRACE_S = 35 * 86_400   # counters outlive their window long enough for last month's report
USER_KEY_GRACE_S = 3_600    # a per-user counter only as long as replicas' clocks may disagree (user_slots)
MAX_MATCHES = 4096          # (caller, model) pairs kept; more are dropped together and found again
# Rate windows a spare reservation may hold on: its bucket (1/20 of the window) outlasts a batch of spares.
# Never in-flight counters (an idle spare would hold a slot) nor providers' limits (skipped per request).
SPARE_PERS = frozenset({"minute", "hour"})


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


def budget_slots(policies: Sequence[Policy], now: float, windows: WindowCache,
                 caller: CallerIdentity | None = None, model: str = "") -> tuple[BudgetSlot, ...]:
    """One slot per policy budget, in the windows holding `now` (per `each` value of `caller` and `model`)."""
    slots = []
    for policy in policies:
        each = None if policy.each is None or caller is None else each_value(policy, caller, model)
        for budget in policy.budgets:
            window = windows.window_for(budget.period, policy.timezone, now)
            grace = USER_KEY_GRACE_S if policy.each == "user" else KEY_GRACE_S
            slots.append(BudgetSlot(CounterKey(policy.name, budget.period, with_each(window.id, each)),
                                    limits_of(budget), window.end_ts + grace, policy, window))
    return tuple(slots)


Slot = BudgetSlot | RateSlot


class Match:
    """The policies a (caller, model) pair must fit, and their slots while `now` is in [since, until).

    `rated`: some slot is a rate window or an in-flight counter; `spareable`: the match may take spare
    reservations (no rate slot, or only policy windows of a minute or longer: see SPARE_PERS; no `each: user`
    policy, whose counters are named per request: gateway.budget.user_slots); `per_user`: some policy counts
    each end user apart;
    `need_group`: every target provider has its own rate limits, so a request none of them has room for
    is refused.
    """

    __slots__ = ("policies", "names", "slots", "since", "until", "caller", "model", "providers", "rated",
                 "need_group", "spareable", "hits", "per_user")

    def __init__(self, policies: list[Policy], caller: CallerIdentity | None = None, model: str = "",
                 providers: Sequence[ProviderConfig] = ()) -> None:
        self.policies = policies
        self.names = tuple(dict.fromkeys(policy.name for policy in policies))
        self.slots: tuple[Slot, ...] = ()
        self.hits: tuple[tuple[Slot, ...], tuple[RateSlot, ...]] | None = None   # see hit_slots
        self.since = self.until = 0.0
        self.caller, self.model = caller, model
        self.providers = providers if any(provider.rate_limits for provider in providers) else ()
        self.rated = bool(self.providers) or any(policy.limits_rate for policy in policies)
        self.need_group = bool(providers) and all(provider.rate_limits for provider in providers)
        self.per_user = any(policy.each == "user" for policy in policies)
        self.spareable = not self.providers and not self.per_user and all(
            policy.max_concurrent is None and all(limit.per in SPARE_PERS for limit in policy.rate_limits)
            for policy in policies)

    @property
    def limited(self) -> bool:
        """Something to reserve on: a matching policy or a rate-limited target provider."""
        return bool(self.policies) or bool(self.providers)


class SlotCache:
    """Matching policies per (caller, model) for one Settings, and their budget slots per window."""

    def __init__(self) -> None:
        self._settings: Settings | None = None
        self._matches: dict[tuple[CallerIdentity, str], Match] = {}
        self._windows = WindowCache()

    def match(self, settings: Settings, caller: CallerIdentity, model: str, plan: Plan | None = None) -> Match:
        """What a request by `caller` for `model` (served by `plan`'s targets) must fit under `settings`."""
        if settings is not self._settings or len(self._matches) >= MAX_MATCHES:
            self._settings, self._matches = settings, {}
        match = self._matches.get((caller, model))
        if match is None:
            providers = [] if plan is None else [settings.providers[target.provider] for target in plan.targets
                                                 if target.provider in settings.providers]
            match = self._matches[(caller, model)] = Match(matching_policies(settings.policies, caller, model),
                                                           caller, model, providers)
        return match

    def slots(self, match: Match, now: float, lease_s: float = 0.0, user: str | None = None) -> tuple[Slot, ...]:
        """The match's slots in the windows holding `now`: budgets, then rate windows, then providers'; those of
        `each: user` policies named for `user` (see gateway.budget.user_slots)."""
        if not match.since <= now < match.until:
            budgets = budget_slots(match.policies, now, self._windows, match.caller, match.model)
            windows = [slot.window for slot in budgets]
            match.since = max((w.start_ts for w in windows), default=now)
            match.until = min((w.end_ts for w in windows), default=now)
            match.slots = budgets
            if match.rated:
                assert match.caller is not None
                rates = rate_slots(match.policies, match.caller, match.model, now, lease_s)
                rates += provider_slots(match.providers, now)
                match.until = min([match.until, *(slot.until for slot in rates)]) if windows else \
                    min(slot.until for slot in rates)
                match.slots = (*budgets, *rates)
        return match.slots if not match.per_user else user_slots(match.slots, user)


def hit_slots(match: Match, user: str | None = None) -> tuple[RateSlot, ...]:
    """The slots a cache hit counts on (of `match.slots`): its policies' request-rate windows and in-flight
    counters (of `user`, for `each: user` policies); not budgets, token windows nor providers' limits (a hit
    costs nothing and calls no provider)."""
    cached = match.hits
    if cached is None or cached[0] is not match.slots:
        counted = tuple([slot for slot in match.slots if isinstance(slot, RateSlot) and slot.provider is None
                         and (slot.limit is None or slot.limit.requests is not None)])
        cached = match.hits = (match.slots, counted)
    return cached[1] if not match.per_user else user_slots(cached[1], user)
