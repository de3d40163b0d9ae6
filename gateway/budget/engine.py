"""Budget enforcement: reserve the worst case before the upstream call, settle the real cost after.

One store round trip reserves every matched policy window at once (all or nothing) and one settles
it, writing the request's ledger row in the same operation; `on_settled` listeners (budget alerts)
then get the counters' states. A store outage answers 503 (`fail_closed`) or serves within a local
allowance (`fail_open`); spend the store could not take goes to a durable journal that is replayed
when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, NamedTuple, TypeVar

from gateway.access_log import AccessRecord
from gateway.budget.allowance import LocalAllowance
from gateway.budget.journal import Replay, SpendJournal
from gateway.budget.ledger import ledger_entry
from gateway.budget.slots import KEY_GRACE_S, SlotCache, budget_slots, limits_of
from gateway.budget.spares import SPARE_ROOM, Spare, SparePool, SpareReservations
from gateway.budget.store import MAX_AMOUNT, BudgetStore, CounterState, LedgerEntry, ReserveLine, ReserveOutcome
from gateway.budget.windows import Window, WindowCache, seconds_until_reset
from gateway.budget.worst_case import WorstCase, worst_case
from gateway.clock import Clock
from gateway.config.model import CallerIdentity, Policy, Settings, StoreConfig
from gateway.errors import BudgetExceeded, StoreError, StoreUnavailable
from gateway.pricing import Charge, format_usd
from gateway.proxy.plan import Plan, plan_for
from gateway.proxy.request import ProxyRequest

__all__ = ["Reservation", "SettleListener", "BudgetEngine", "budget_lines", "limits_of", "KEY_GRACE_S"]

log = logging.getLogger("gateway.budget")
RETRY_STORE_AFTER_S = 1.0   # after repeated store errors, requests skip the store this long (the replayer probes)
FAILURES_BEFORE_SKIPPING_STORE = 3   # one slow call (a fork for BGSAVE) is not an outage
T = TypeVar("T")


def _bounded(charge: Charge | None) -> Charge | None:
    """A charge the store can hold: an absurd upstream usage is capped, never an error that loses spend."""
    if charge is None or max(charge) <= MAX_AMOUNT:
        return charge
    return Charge(min(charge.usd_nano, MAX_AMOUNT), min(charge.tokens, MAX_AMOUNT), min(charge.requests, MAX_AMOUNT))


class Reservation(NamedTuple):
    """A request's hold on its budgets; `plan` may be a downgraded one, `worst` bounds its charge and output."""

    request_id: str
    plan: Plan
    worst: WorstCase                     # what is held (with no lines: what would have been), see worst_case
    lines: tuple[ReserveLine, ...] = ()
    local: bool = False                 # held in this replica's fail-open allowance, not in the store
    downgraded_from: str | None = None
    caller: CallerIdentity | None = None

    policies: tuple[str, ...] = ()       # names of the policies it holds budget on
    spare_id: str | None = None          # held under a spare reservation's id (see gateway.budget.spares)

    @property
    def held_as(self) -> str:
        """The id the store holds the reservation under."""
        return self.spare_id or self.request_id


SettleListener = Callable[[Sequence[CounterState]], None]   # the settled counters' states


def budget_lines(policies: Sequence[Policy], amount: Charge, now: float) -> list[tuple[ReserveLine, Policy, Window]]:
    """One reserve line per policy budget window, with the policy and window it came from."""
    return [(slot.line(amount), slot.policy, slot.window) for slot in budget_slots(policies, now, WindowCache())]


def _format_limit(unit: str, limit: int) -> str:
    return f"{format_usd(limit)} USD" if unit == "usd" else f"{limit} {unit}"


def exceeded_error(policy: Policy, window: Window, unit: str, limit: int, now: float) -> BudgetExceeded:
    """The 429 a refused request gets: which policy, which period, which limit, when it resets."""
    resets_at = window.end.isoformat()
    message = (f"Budget exceeded: policy '{policy.name}' {policy_period(window)} limit of "
               f"{_format_limit(unit, limit)} does not allow this request; the window resets at {resets_at}.")
    error = BudgetExceeded(message, headers={
        "Retry-After": str(seconds_until_reset(window, now)), "x-should-retry": "false"})
    error.policy, error.period = policy.name, policy_period(window)
    return error


def held_error(policy: Policy, window: Window, unit: str, limit: int) -> BudgetExceeded:
    """The 429 of a request refused only while reservations in flight hold the room: retry in a second."""
    message = (f"Budget busy: policy '{policy.name}' {policy_period(window)} limit of {_format_limit(unit, limit)} "
               "is held by requests in flight (and spare reservations, released after a second unused); "
               "try again in a second.")
    error = BudgetExceeded(message, headers={"Retry-After": "1", "x-should-retry": "true"})
    error.policy, error.period = policy.name, policy_period(window)
    return error


def policy_period(window: Window) -> str:
    return "daily" if window.id.startswith("d") else "monthly"


class BudgetEngine:
    """Reserves, settles and releases budget for requests; reads the store for status."""

    def __init__(self, store: BudgetStore | None, clock: Clock, config: StoreConfig,
                 journal: SpendJournal | None = None) -> None:
        self.store = store
        self.clock = clock
        self.config = config
        self.journal = journal
        self.allowance = LocalAllowance(float(config.fail_open_allowance))
        self.on_settled: list[SettleListener] = []
        self._slots = SlotCache()
        self._store_down_until = 0.0
        self._store_failures = 0
        self._background: set[asyncio.Future[Any]] = set()
        self._pipelined = bool(getattr(store, "pipelined", False))
        self._closing = False
        # a spare is taken well within its lease, so the request's lease is about as long as its own would be
        idle_s = min(config.reserve_ahead_idle_s, config.lease_s / 10)
        self.spares = SpareReservations(idle_s, clock.monotonic, self._release_spare) \
            if config.reserve_ahead and store is not None else None

    async def reserve(self, request_id: str, settings: Settings, caller: CallerIdentity,
                      plan: Plan, req: ProxyRequest) -> Reservation:
        """Hold the request's worst case on every matching policy, or raise BudgetExceeded."""
        match = self._slots.match(settings, caller, plan.model)
        worst = worst_case(req, plan, match.policies)
        if not match.policies or self.store is None:
            return Reservation(request_id, plan, worst)
        now = self.clock.now()
        slots = self._slots.slots(match, now)
        amount = worst.amount
        spares, pool = self.spares, None
        if spares is not None:
            pool = spares.pool(slots)
            spare = spares.take(pool, amount)
            if spare is not None:
                self._reserve_ahead(pool, spare.lines, amount)
                return self._on_spare(request_id, plan, worst, spare, caller, match.names)
        lines = tuple([slot.line(amount) for slot in slots])
        outcome = await self._reserve_lines(request_id, lines, now)
        if outcome is not None and not outcome.ok and spares is not None and pool is not None:
            self._send_queued()              # a batch on its way that waits for company: now
            spare, released = await spares.reclaim(pool, amount)
            if spare is not None:
                return self._on_spare(request_id, plan, worst, spare, caller, match.names)
            if released:                     # the spares held the headroom this request needs
                # kept to their end if the client leaves meanwhile: a spare must never linger
                await asyncio.shield(asyncio.gather(*[self._release_spare(spare) for spare in released],
                                                    return_exceptions=True))
                outcome = await self._reserve_lines(request_id, lines, now)
        if outcome is None or outcome.ok:
            if pool is not None and outcome is not None:
                self._reserve_ahead(pool, lines, amount)
            return Reservation(request_id, plan, worst, lines, local=outcome is None, caller=caller,
                               policies=match.names)
        line, slot = lines[outcome.refused_index or 0], slots[outcome.refused_index or 0]
        downgrade = await self._downgrade(request_id, settings, caller, req, slot.policy, plan)
        if downgrade is not None:
            return downgrade
        unit = outcome.refused_unit or "usd"
        limit = line.limits[("usd", "tokens", "requests").index(unit)] or 0
        if outcome.held:
            raise held_error(slot.policy, slot.window, unit, limit)
        raise exceeded_error(slot.policy, slot.window, unit, limit, now)

    async def _downgrade(self, request_id: str, settings: Settings, caller: CallerIdentity, req: ProxyRequest,
                         policy: Policy, plan: Plan) -> Reservation | None:
        """Serve with the refusing policy's cheaper model while that model is within budget."""
        if policy.on_exceed != "downgrade" or not policy.downgrade_to or policy.downgrade_to == plan.model:
            return None
        cheaper = plan_for(settings, policy.downgrade_to)   # logs and the ledger name the model that serves
        match = self._slots.match(settings, caller, policy.downgrade_to)
        now = self.clock.now()
        worst = worst_case(req, cheaper, match.policies)
        lines = tuple(slot.line(worst.amount) for slot in self._slots.slots(match, now))
        outcome = await self._reserve_lines(request_id, lines, now)
        if outcome is not None and not outcome.ok:
            return None
        return Reservation(request_id, cheaper, worst, lines, local=outcome is None,
                           downgraded_from=plan.model, caller=caller, policies=match.names)

    @staticmethod
    def _on_spare(request_id: str, plan: Plan, worst: WorstCase, spare: Spare, caller: CallerIdentity,
                  policies: tuple[str, ...]) -> Reservation:
        # by position (not local, not downgraded): with keywords a NamedTuple costs ~1.6k instructions more
        return Reservation(request_id, plan, worst, spare.lines, False, None, caller, policies, spare.spare_id)

    def _reserve_ahead(self, pool: SparePool, lines: Sequence[ReserveLine], amount: Charge) -> None:
        """Ask for the spares the pool wants, with `amount`, after the current request has gone upstream."""
        now = self.clock.monotonic()
        count = pool.wanted(now)
        if not count or self._closing or now < self._store_down_until:
            return
        assert self.spares is not None
        if lines[0].amount is not amount:
            lines = tuple([line._replace(amount=amount) for line in lines])
        batch = self.spares.new_batch(pool, lines, amount, count)
        assert pool.making is not None
        self._keep(pool.making)
        # call_soon: the store call is written after the request that asked for it is on its way upstream
        # (the pool's future knows the loop: asyncio.get_running_loop costs a getpid system call on 3.11)
        pool.making.get_loop().call_soon(self._make_spares, pool, batch)

    def _make_spares(self, pool: SparePool, batch: list[Spare]) -> None:
        assert self.store is not None and self.spares is not None
        now = self.clock.now()
        # A pool still half full can wait for company; one running low is sent now, or requests find it
        # empty meanwhile and reserve on their own. A pool of one waits too: the request that finds it
        # empty doubles it (see SpareReservations.take), so steady traffic grows it to where it can wait.
        lazy = 2 * len(pool.spares) >= pool.depth - 1
        try:
            call = self.store.reserve_spares([spare.spare_id for spare in batch], batch[0].lines, now,
                                             now + self.config.lease_s, SPARE_ROOM, lazy=lazy)
        except Exception as exc:             # nothing was sent; a request waiting for the batch goes on
            self.spares.not_made(pool)
            if not isinstance(exc, StoreError):
                log.error("asking for spare reservations failed: %r", exc)
            return
        future = asyncio.ensure_future(self._bounded(call))
        self._keep(future)
        future.add_done_callback(functools.partial(self._spares_answered, pool, batch))

    def _spares_answered(self, pool: SparePool, batch: list[Spare], call: asyncio.Future[ReserveOutcome]) -> None:
        assert self.spares is not None
        answered = not call.cancelled() and call.exception() is None
        if answered and not call.result().ok:
            self.spares.not_made(pool, refused=True)
        elif answered and not self._closing:
            self.spares.made(pool, batch)
            self._reserve_ahead(pool, batch[0].lines, batch[0].amount)   # the pool deepened meanwhile
        else:   # close() stopped waiting for them, or the reply was lost after the store applied them
            self.spares.not_made(pool)
            for spare in batch:
                self._release_spare(spare)

    def _release_spare(self, spare: Spare) -> asyncio.Task[None]:
        """Give a spare back to the store, in the background; journaled when the store fails."""
        return self._spawn(self._give_back_spare(spare))

    async def _give_back_spare(self, spare: Spare) -> None:
        assert self.store is not None
        try:
            await self._bounded(self.store.release(spare.spare_id, self.clock.now()))
        except (StoreError, TimeoutError) as exc:
            self._mark_down(exc)
            try:                             # replayed as a release when the store is back (within the lease)
                await self._append_journal(spare.spare_id, spare.lines, Charge(), None, "release")
            except OSError:
                log.exception("journaling the release of spare %s failed", spare.spare_id)

    async def _reserve_lines(self, request_id: str, lines: Sequence[ReserveLine],
                             now: float) -> ReserveOutcome | None:
        """The store's answer, or None when the request is admitted on the local fail-open allowance."""
        assert self.store is not None
        if self.clock.monotonic() >= self._store_down_until:
            try:
                if self._pipelined:
                    outcome = await self.store.reserve(request_id, lines, now, now + self.config.lease_s)
                else:
                    outcome = await self._bounded(self._store_reserve(request_id, lines, now))
                self._store_failures = 0
                return outcome
            except asyncio.CancelledError:
                if self._pipelined:
                    # The client left. The store answers calls in the order they are made, so a release
                    # made now runs after the reserve (a no-op if the reserve was never sent).
                    self._spawn(self._release_quietly(request_id, now))
                raise
            except (StoreError, TimeoutError) as exc:
                self._mark_down(exc)
                # The store may have applied the reservation before the reply was lost.
                self._spawn(self._release_quietly(request_id, now))
        if self.config.on_outage == "fail_open" and self.allowance.try_take(lines):
            return None
        raise StoreUnavailable("The budget store is unreachable, so the gateway cannot check this request's "
                               "budget; try again shortly.", headers={"Retry-After": "1"})

    async def _store_reserve(self, request_id: str, lines: Sequence[ReserveLine], now: float) -> ReserveOutcome:
        """The store's reserve (not pipelined), run to its end even when the client leaves meanwhile.

        A client that disconnects does not cancel the store call half-way: the reservation is completed
        and then released, so it never lingers until its lease turns it into spend.
        """
        assert self.store is not None
        call = asyncio.ensure_future(self.store.reserve(request_id, lines, now, now + self.config.lease_s))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(lambda done: self._release_abandoned(request_id, done))
            raise

    def _release_abandoned(self, request_id: str, call: asyncio.Future[ReserveOutcome]) -> None:
        """Release what a reserve whose client left has reserved."""
        if not call.cancelled() and call.exception() is None and call.result().ok:
            self._spawn(self._release_quietly(request_id, self.clock.now()))

    def _bounded(self, call: Awaitable[T]) -> Awaitable[T]:
        """`call`, bounded by the hard timeout unless the store bounds the time of its own calls."""
        return call if self._pipelined else self._within_hard_timeout(call)

    async def _within_hard_timeout(self, call: Awaitable[T]) -> T:
        async with asyncio.timeout(self._hard_timeout()):
            return await call

    async def _release_quietly(self, request_id: str, now: float) -> None:
        assert self.store is not None
        with contextlib.suppress(StoreError, TimeoutError):
            await self._bounded(self.store.release(request_id, now))

    def settle(self, reservation: Reservation, charge: Charge | None,
               record: AccessRecord | None = None) -> asyncio.Future[Any] | None:
        """Start charging the request's real cost (None: it was not served, release it); ledger it from `record`.

        The settlement runs in the background, so the response does not wait for the store; it is kept
        to its end (a client that disconnects cannot cancel it), and `settled` and `close` wait for it.
        Spend the store cannot take goes to the journal. Returns what to await for it, if anything.
        """
        if not reservation.lines:
            return None
        charge = _bounded(charge)
        entry = ledger_entry(reservation, charge, record, self.clock.now())
        if reservation.local:
            return self._spawn(self._settle_locally(reservation, charge, entry))
        try:
            call = self._store_settle(reservation, charge, entry)
        except StoreError as exc:
            return self._spawn(self._store_failed(exc, reservation, charge, entry))
        if self._pipelined and isinstance(call, asyncio.Future):
            # A pipelined call times itself: one callback finishes it, no task needed per request.
            self._background.add(call)
            call.add_done_callback(functools.partial(self._settled, reservation, charge, entry))
            return call
        return self._spawn(self._await_settle(call, reservation, charge, entry))

    def _store_settle(self, reservation: Reservation, charge: Charge | None, entry: LedgerEntry) -> Awaitable[Any]:
        """The store call: settle the real cost, or release when nothing is charged."""
        assert self.store is not None
        # lazy: the client has its answer, nobody waits for this one
        if charge is None:
            return self.store.release(reservation.held_as, entry.time, entry, lazy=True)
        return self.store.settle(reservation.held_as, [(line.counter, charge) for line in reservation.lines],
                                 entry.time, entry, lazy=True)

    async def _await_settle(self, call: Awaitable[Any], reservation: Reservation, charge: Charge | None,
                            entry: LedgerEntry) -> None:
        try:
            result = await self._bounded(call)
        except (StoreError, TimeoutError) as exc:
            await self._store_failed(exc, reservation, charge, entry)
            return
        self._store_answered(result)

    def _settled(self, reservation: Reservation, charge: Charge | None, entry: LedgerEntry,
                 call: asyncio.Future[Any]) -> None:
        """A pipelined settlement's answer: counters to the listeners, or spend to the journal."""
        self._background.discard(call)
        if call.cancelled():                 # the store was closed under it
            self._spawn(self._store_failed(StoreError("the store was closed"), reservation, charge, entry))
            return
        error = call.exception()
        if error is None:
            self._store_answered(call.result())
        elif isinstance(error, (StoreError, TimeoutError)):
            self._spawn(self._store_failed(error, reservation, charge, entry))
        else:
            log.error("settling request %s failed: %r", reservation.request_id, error)

    def _store_answered(self, result: Any) -> None:
        self._store_failures = 0
        if result and not isinstance(result, bool):   # a settle's counter states (a release says True/False)
            self._notify_settled(result)

    async def _store_failed(self, exc: BaseException, reservation: Reservation, charge: Charge | None,
                            entry: LedgerEntry) -> None:
        self._mark_down(exc)
        await self._journal(reservation, charge, entry)

    async def _settle_locally(self, reservation: Reservation, charge: Charge | None, entry: LedgerEntry) -> None:
        """A request admitted on the fail-open allowance: adjust the allowance, journal the spend."""
        self.allowance.adjust(reservation.lines, charge)
        await self._journal(reservation, charge, entry)

    def _notify_settled(self, states: Sequence[CounterState]) -> None:
        """Hand the settled counters to every listener; a failing listener never fails the request."""
        for listener in self.on_settled:
            try:
                listener(states)
            except Exception:
                log.exception("a budget settle listener failed")

    async def _journal(self, reservation: Reservation, charge: Charge | None, entry: LedgerEntry) -> None:
        """Keep spend the store could not take, with its ledger row; a release is journaled as zero spend.

        A reservation held in the store is settled or released again on replay (a no-op if the first try
        did reach the store); one held locally is recorded.
        """
        replay: Replay = "record" if reservation.local else "release" if charge is None else "settle"
        await self._append_journal(reservation.held_as, reservation.lines, charge or Charge(), entry, replay)

    async def _append_journal(self, held_as: str, lines: Sequence[ReserveLine], spent: Charge,
                              entry: LedgerEntry | None, replay: Replay) -> None:
        """Journal `spent` on each line's counter under the store's id for it (an error log without a journal)."""
        if self.journal is None:
            log.error("budget store unreachable and no journal configured: %s not settled", held_as)
            return
        spend = [(line.counter, spent, line.expires_at) for line in lines]
        # fsync off the loop
        await asyncio.to_thread(self.journal.append, held_as, spend, entry, replay)

    async def recover(self) -> bool:
        """Replay the journal when the store answers again; True when the store is healthy."""
        if self.store is None:
            return True
        try:
            async with asyncio.timeout(self._hard_timeout()):
                healthy = await self.store.ping()
            if healthy and self.journal is not None and self.journal.has_entries():
                replayed = await self.journal.replay(self.store, self.clock.now())
                log.info("budget store is back: replayed %d journaled requests", replayed)
        except (StoreError, TimeoutError) as exc:
            self._mark_down(exc)
            return False
        if healthy:
            self._store_down_until = 0.0
            self._store_failures = 0
            self.allowance.clear()
        return healthy

    async def ping(self) -> bool:
        """True when the store answers (always, without policies' store)."""
        if self.store is None:
            return True
        try:
            async with asyncio.timeout(self._hard_timeout()):
                return await self.store.ping()
        except (StoreError, TimeoutError):
            return False

    def _hard_timeout(self) -> float:
        """A bound on one store call even if a driver timeout fails: connecting plus one command."""
        return max(1.0, 4 * self.config.timeout_s) + 2 * self.config.timeout_s

    def _mark_down(self, exc: BaseException) -> None:
        """Count a store failure; after a few in a row, requests skip the store until the replayer sees it back."""
        self._store_failures += 1
        if self._store_failures == FAILURES_BEFORE_SKIPPING_STORE:
            log.warning("budget store unreachable (%s); mode %s", exc, self.config.on_outage)
        if self._store_failures >= FAILURES_BEFORE_SKIPPING_STORE:
            self._store_down_until = self.clock.monotonic() + RETRY_STORE_AFTER_S

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `coro` to completion even if its caller is cancelled; kept until done."""
        task = asyncio.ensure_future(coro)
        self._keep(task)
        return task

    def _keep(self, work: asyncio.Future[Any]) -> None:
        """Hold background work until it is done (`settled` and `close` wait for it)."""
        self._background.add(work)
        work.add_done_callback(self._background.discard)

    async def settled(self) -> None:
        """Wait until the settlements started so far have reached the store (or the journal)."""
        if self._background:
            self._send_queued()              # sent now rather than after their wait for company
            await asyncio.wait(list(self._background))

    def _send_queued(self) -> None:
        """Send the store calls waiting to share a write now: someone waits for them."""
        send_queued = getattr(self.store, "send_queued", None)
        if send_queued is not None:
            send_queued()

    async def quiet(self) -> None:
        """Wait until no store work is left, spares asked for meanwhile included (with no traffic: tests)."""
        while self._background:
            await asyncio.wait(list(self._background))

    async def close(self) -> None:
        """Finish settlements still running, release the spares, then close the store."""
        self._closing = True                 # no more spares: those being made land, then all are released
        if self._background:
            await asyncio.wait(self._background, timeout=self._hard_timeout())
        if self.spares is not None:
            self.spares.drain()
        if self._background:
            await asyncio.wait(self._background, timeout=self._hard_timeout())
        if self.store is not None:
            await self.store.close()

