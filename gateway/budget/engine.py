"""Budget enforcement: reserve the worst case before the upstream call, settle the real cost after.

One store round trip reserves every matched policy window at once (all or nothing) and one settles
it, writing the request's ledger row in the same operation; `on_settled` listeners (budget alerts)
then get the counters' states. A store outage answers 503 (`fail_closed`) or serves within a local
allowance (`fail_open`); spend the store could not take goes to a durable journal that is replayed
when it is back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any

from gateway.budget.burn import BurnTracker
from gateway.budget.hit_rows import HitRows
from gateway.budget.journal import SpendJournal
from gateway.budget.ledger import cache_hit_entry, ledger_entry
from gateway.budget.outage import Outage
from gateway.budget.rate_refusals import rate_headers, rate_limited
from gateway.budget.rate_slots import RateSlot
from gateway.budget.refusals import exceeded_error, held_error
from gateway.budget.reservation import Downgrade, Reservation
from gateway.budget.reserve_ahead import ReserveAhead
from gateway.budget.settlements import SettleListener, Settlements
from gateway.budget.slots import KEY_GRACE_S, Match, Slot, SlotCache, hit_slots, limits_of
from gateway.budget.spares import Spare, SparePool
from gateway.budget.store import MAX_AMOUNT, UNITS, BudgetStore, ReserveLine, ReserveOutcome
from gateway.budget.store_calls import StoreCalls
from gateway.clock import Clock
from gateway.config.model import CallerIdentity, Settings, StoreConfig
from gateway.domain.ledger_facts import LedgerFacts
from gateway.domain.plan import Plan
from gateway.domain.pricing import Charge, Usage
from gateway.domain.request import ProxyRequest
from gateway.domain.worst_case import WorstCase, worst_case
from gateway.errors import StoreError

__all__ = ["Reservation", "Downgrade", "SettleListener", "BudgetEngine", "limits_of", "KEY_GRACE_S"]


def _storable(charge: Charge | None) -> Charge | None:
    """A charge the store can hold: an absurd upstream usage is capped, never an error that loses spend."""
    if charge is None or max(charge) <= MAX_AMOUNT:
        return charge
    return Charge(min(charge.usd_nano, MAX_AMOUNT), min(charge.tokens, MAX_AMOUNT), min(charge.requests, MAX_AMOUNT))


class BudgetEngine:
    """Reserves, settles and releases budget for requests; reads the store for status.

    The rules live here; the parts it leans on each do one job: `StoreCalls` (how store calls are made
    and kept), `Outage` (store failures, fail-open allowance, journal, recovery), `Settlements` (settling
    off the response's path) and `ReserveAhead` (spare reservations).
    """

    def __init__(self, store: BudgetStore | None, clock: Clock, config: StoreConfig,
                 journal: SpendJournal | None = None) -> None:
        self.store = store
        self.clock = clock
        self.config = config
        self.journal = journal
        self._slots = SlotCache()
        self._calls = StoreCalls(store, clock, config)
        self._outage = Outage(self._calls, clock, config, journal)
        self._settlements = Settlements(self._calls, self._outage)
        self._hit_rows = HitRows(self._calls)
        self._ahead = ReserveAhead(self._calls, self._outage, clock, config) \
            if config.reserve_ahead and store is not None else None
        self.allowance = self._outage.allowance
        self.on_settled: list[SettleListener] = self._settlements.listeners
        self.spares = self._ahead.spares if self._ahead is not None else None
        self.burn = BurnTracker()            # the last hour's spend per counter, for forecasts (status only)

    async def reserve(self, request_id: str, settings: Settings, caller: CallerIdentity,
                      plan: Plan, req: ProxyRequest) -> Reservation | Downgrade:
        """Hold the request's worst case on every matching policy; else a Downgrade, or raise BudgetExceeded."""
        match = self._slots.match(settings, caller, plan.model, plan)
        worst = worst_case(req, plan, match.policies)
        if not match.limited or self.store is None:
            return Reservation(request_id, plan, worst)
        now = self.clock.now()
        slots = self._slots.slots(match, now, self.config.lease_s, req.user)   # per_user: never spareable
        ahead = self._ahead
        if ahead is None or not match.spareable:   # see gateway.budget.slots.SPARE_PERS
            return await self._reserve_direct(request_id, plan, match, slots, worst, now)
        amount = worst.amount
        spares = ahead.spares
        pool = spares.pool(slots, match.until - now) if match.rated else spares.pool(slots)
        spare = spares.take(pool, amount)
        if spare is not None:
            ahead.reserve_ahead(pool, spare.lines, amount)
            return _on_spare(request_id, plan, worst, spare, match, self._headers(match, pool, now))
        lines = tuple([slot.line(amount) for slot in slots])
        outcome = await self._outage.reserve(request_id, lines, now)
        if outcome is not None and not outcome.ok:
            spare, outcome = await self._reclaim(request_id, pool, amount, lines, now, outcome)
            if spare is not None:
                return _on_spare(request_id, plan, worst, spare, match, self._headers(match, pool, now))
        if outcome is None or outcome.ok:
            if outcome is not None:
                pool.used = outcome.used or pool.used
                ahead.reserve_ahead(pool, lines, amount)
            return Reservation(request_id, plan, worst, lines, outcome is None, None, caller, match.names, None,
                               self._headers(match, pool, now))
        return _refused(plan, slots, lines, outcome, now)

    def _headers(self, match: Match, pool: SparePool, now: float) -> dict[str, str] | None:
        """x-ratelimit-* of a request on `pool`'s windows, from what the store last said they hold; made once
        per answer and second (the resets of minute and hour windows are whole seconds)."""
        if not match.rated or not pool.used:
            return None
        cached, second = pool.headers, int(now)
        if cached is not None and cached[0] is pool.used and cached[1] == second:
            return cached[2]
        headers = rate_headers(match.slots, pool.used, now)
        pool.headers = (pool.used, second, headers)
        return headers

    async def _reserve_direct(self, request_id: str, plan: Plan, match: Match, slots: tuple[Slot, ...],
                             worst: WorstCase, now: float) -> Reservation | Downgrade:
        """Reserve budgets, rate windows and flights in one store call, without spares; skip providers at
        their limit."""
        lines = tuple([slot.line(worst.amount) for slot in slots])
        outcome = await self._outage.reserve(request_id, lines, now, match.need_group)
        if outcome is not None and not outcome.ok:
            return _refused(plan, slots, lines, outcome, now)
        skip, lines = _skipping(slots, lines, outcome)
        headers = rate_headers(slots, outcome.used, now) if outcome is not None and match.rated else None
        return Reservation(request_id, plan, worst, lines, outcome is None, None, match.caller, match.names, None,
                           headers, skip)

    async def _reclaim(self, request_id: str, pool: SparePool, amount: Charge, lines: tuple[ReserveLine, ...],
                       now: float, outcome: ReserveOutcome) -> tuple[Spare | None, ReserveOutcome | None]:
        """After the store refused: a spare of the pool, else the store asked again once this replica's spares
        on the same counters are back (they may have held the room this request needs)."""
        assert self._ahead is not None
        spare, given_back = await self._ahead.reclaim(pool, amount)
        if spare is None and given_back:
            return None, await self._outage.reserve(request_id, lines, now)
        return spare, outcome

    async def reserve_downgraded(self, request_id: str, settings: Settings, caller: CallerIdentity,
                                 cheaper: Plan, req: ProxyRequest, downgrade: Downgrade) -> Reservation:
        """Hold the request on `cheaper` (the plan of the downgrade's model) while it is within budget, else 429."""
        match = self._slots.match(settings, caller, cheaper.model, cheaper)
        now = self.clock.now()
        worst = worst_case(req, cheaper, match.policies)
        slots = self._slots.slots(match, now, self.config.lease_s, req.user)
        lines = tuple(slot.line(worst.amount) for slot in slots)
        outcome = await self._outage.reserve(request_id, lines, now, match.need_group)
        if outcome is not None and not outcome.ok:
            raise downgrade.refusal
        skip, lines = _skipping(slots, lines, outcome)
        headers = rate_headers(slots, outcome.used, now) if outcome is not None and match.rated else None
        return Reservation(request_id, cheaper, worst, lines, local=outcome is None,
                           downgraded_from=downgrade.downgraded_from, caller=caller, policies=match.names,
                           headers=headers, skip=skip)

    def settle(self, reservation: Reservation, charge: Charge | None,
               facts: LedgerFacts | None = None) -> asyncio.Future[Any] | None:
        """Start charging the request's real cost (None: it was not served, release it); ledger it with `facts`.

        The settlement runs in the background, so the response does not wait for the store; it is kept
        to its end (a client that disconnects cannot cancel it), and `settled` and `close` wait for it.
        Spend the store cannot take goes to the journal. Returns what to await for it, if anything.
        """
        if not reservation.lines:
            return None
        charge = _storable(charge)
        entry = ledger_entry(reservation, charge, facts, self.clock.now())
        if reservation.local:
            return self._calls.spawn(self._outage.settle_locally(reservation.held_as, reservation.lines, charge, entry))
        return self._settlements.start(reservation, charge, entry, facts.provider if facts is not None else None)

    async def reserve_hit(self, request_id: str, settings: Settings, caller: CallerIdentity,
                          plan: Plan, user: str | None = None) -> Reservation | None:
        """Hold a cache hit as one request on its policies' request-rate windows and in-flight counters (see
        hit_slots), or raise RateLimited; None when none limits it, or the store is out (fail_open)."""
        match = self._slots.match(settings, caller, plan.model, plan)
        if not match.rated or self.store is None:
            return None
        now = self.clock.now()
        self._slots.slots(match, now, self.config.lease_s)
        slots = hit_slots(match, user)
        if not slots:
            return None
        lines = tuple([slot.line(_ONE_REQUEST) for slot in slots])
        outcome = await self._outage.reserve(request_id, lines, now)
        if outcome is None:
            return None
        if not outcome.ok:
            raise rate_limited(slots[outcome.refused_index or 0], outcome, now)
        return Reservation(request_id, plan, _NO_COST, lines, False, None, caller, match.names, None,
                           rate_headers(slots, outcome.used, now))

    def limits_hits(self, settings: Settings, caller: CallerIdentity, plan: Plan) -> bool:
        """Whether `reserve_hit` may hold a cache hit of `caller` on `plan` (a rate window or in-flight counter
        applies to it)."""
        return self.store is not None and self._slots.match(settings, caller, plan.model, plan).rated

    def file_cache_hit(self, settings: Settings, caller: CallerIdentity, request_id: str, facts: LedgerFacts,
                       saved_nano: int, held: Reservation | None = None) -> tuple[str, ...]:
        """Ledger a request answered from the response cache, settling what `reserve_hit` held as one request
        of no cost; else only its row, written in the background (lost, not journaled, if the store fails: it
        moves no counter), with the other hits of the moment (see HitRows). Its policies."""
        if held is not None:
            entry = cache_hit_entry(request_id, caller, held.policies, facts, saved_nano, self.clock.now())
            self._settlements.start(held, _ONE_REQUEST, entry)
            return held.policies
        match = self._slots.match(settings, caller, facts.requested_model or "")
        if match.policies and self.store is not None:
            self._hit_rows.add(cache_hit_entry(request_id, caller, match.names, facts, saved_nano, self.clock.now()))
        return match.names

    async def recover(self) -> bool:
        """Replay the journal when the store answers again; True when the store is healthy."""
        return await self._outage.recover()

    async def ping(self) -> bool:
        """True when the store answers (always, without policies' store)."""
        return await self._outage.ping()

    async def settled(self) -> None:
        """Wait until the settlements started so far have reached the store (or the journal)."""
        await self._calls.settled()

    async def quiet(self) -> None:
        """Wait until no store work is left, spares asked for meanwhile included (with no traffic: tests)."""
        await self._calls.quiet()

    async def close(self) -> None:
        """Finish settlements still running, release the spares, then close the store."""
        if self._ahead is not None:
            self._ahead.stop()               # no more spares: those being made land, then all are released
        await self._calls.wind_down()
        if self._ahead is not None:
            self._ahead.drain()
        await self._calls.wind_down()
        if self.store is not None:
            await self.store.close()


_ONE_REQUEST = Charge(0, 0, 1)                     # what a cache hit holds and is charged
_NO_COST = WorstCase(Usage(), _ONE_REQUEST)


def _on_spare(request_id: str, plan: Plan, worst: WorstCase, spare: Spare, match: Match,
              headers: dict[str, str] | None) -> Reservation:
    """A request's reservation held under the spare it took."""
    # by position (not local, not downgraded): with keywords a NamedTuple costs ~1.6k instructions more
    return Reservation(request_id, plan, worst, spare.lines, False, None, match.caller, match.names, spare.spare_id,
                       headers)


def _skipping(slots: tuple[Slot, ...], lines: tuple[ReserveLine, ...], outcome: ReserveOutcome | None
              ) -> tuple[frozenset[str], tuple[ReserveLine, ...]]:
    """The providers the store found at their own rate limit, and the lines left once theirs are dropped."""
    if outcome is None or not outcome.skipped:
        return frozenset(), lines
    skipped = set(outcome.skipped)
    skip = frozenset(slot.provider for slot in slots if isinstance(slot, RateSlot) and slot.group in skipped
                     and slot.provider is not None)
    return skip, tuple([line for line in lines if line.group not in skipped])


def _refused(plan: Plan, slots: tuple[Slot, ...], lines: tuple[ReserveLine, ...], outcome: ReserveOutcome,
             now: float) -> Downgrade:
    """The refusing limit's 429; raised, or carried by a Downgrade when a budget policy downgrades to another
    model."""
    index = outcome.refused_index or 0
    slot = slots[index]
    if isinstance(slot, RateSlot):
        raise rate_limited(slot, outcome, now)
    unit = outcome.refused_unit or "usd"
    limit = lines[index].limits[UNITS.index(unit)] or 0
    policy = slot.policy
    refusal = held_error(policy, slot.window, unit, limit) if outcome.held \
        else exceeded_error(policy, slot.window, unit, limit, now)
    if policy.on_exceed != "downgrade" or not policy.downgrade_to or policy.downgrade_to == plan.model:
        raise refusal
    return Downgrade(policy.downgrade_to, plan.model, refusal)
