"""Making and giving back spare reservations in the store (`gateway.budget.spares` keeps the pools).

After a request reserves (or takes a spare), the spares its pool wants are asked for in one store call,
off the request's path; a batch for a pool still half full may wait a moment to share a write. Spares
not taken go back to the store in the background, journaled when the store fails. A request the store
refuses first takes back the spares this replica holds on its counters (`reclaim`).

On a rate window a batch is asked for with the window's limits less a margin: a quarter of the limit,
and at least MARGIN_WORST_CASES of the batch's worst case (what the full pools of 8 replicas hold). Spares
are made only while that much of the window stays free beside them, so near a rate limit (and on any
window too small for it) every request reserves in the store itself.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Sequence

from gateway.budget.outage import Outage
from gateway.budget.rate_windows import kind_of
from gateway.budget.spares import SPARE_ROOM, Spare, SparePool, SpareReservations
from gateway.budget.store import Limits, ReserveLine, ReserveOutcome
from gateway.budget.store_calls import StoreCalls
from gateway.clock import Clock
from gateway.config.model import StoreConfig
from gateway.domain.pricing import Charge
from gateway.errors import StoreError

__all__ = ["ReserveAhead", "RATE_MARGIN"]

log = logging.getLogger("gateway.budget")
RATE_MARGIN = 4                # a rate window keeps 1/RATE_MARGIN of its limit free of spares...
MARGIN_WORST_CASES = 8 * 32    # ...and at least this many worst cases (8 replicas' pools at MAX_DEPTH)


def _margined(lines: Sequence[ReserveLine]) -> list[ReserveLine]:
    """The lines a batch of spares is asked for with: rate windows' limits less their margin."""
    return [line._replace(limits=_less_margin(line.limits, line.amount)) if kind_of(line.counter) == "rate"
            else line for line in lines]


def _less_margin(limits: Limits, amount: Charge) -> Limits:
    usd, tokens, requests = (None if limit is None else max(0, limit - max(-(-limit // RATE_MARGIN),
                                                                          MARGIN_WORST_CASES * worst))
                             for limit, worst in zip(limits, amount))
    return usd, tokens, requests


class ReserveAhead:
    """Keeps `spares` filled from the store and gives back what is not taken."""

    def __init__(self, calls: StoreCalls, outage: Outage, clock: Clock, config: StoreConfig) -> None:
        self._calls = calls
        self._outage = outage
        self._clock = clock
        self._lease_s = config.lease_s
        self._stopped = False
        # a spare is taken well within its lease, so the request's lease is about as long as its own would be
        idle_s = min(config.reserve_ahead_idle_s, config.lease_s / 10)
        self.spares = SpareReservations(idle_s, clock.monotonic, self.release)

    def reserve_ahead(self, pool: SparePool, lines: Sequence[ReserveLine], amount: Charge) -> None:
        """Ask for the spares the pool wants, with `amount`, after the current request has gone upstream."""
        now = self._clock.monotonic()
        count = pool.wanted(now)
        if not count or self._stopped or now < self._outage.down_until:
            return
        if lines[0].amount is not amount:
            lines = tuple([line._replace(amount=amount) for line in lines])
        batch = self.spares.new_batch(pool, lines, amount, count)
        assert pool.making is not None
        self._calls.keep(pool.making)
        # call_soon: the store call is written after the request that asked for it is on its way upstream
        # (the pool's future knows the loop: asyncio.get_running_loop costs a getpid system call on 3.11)
        pool.making.get_loop().call_soon(self._make, pool, batch)

    def _make(self, pool: SparePool, batch: list[Spare]) -> None:
        calls = self._calls
        assert calls.store is not None
        now = self._clock.now()
        # A pool still half full is not short of spares; one running low is, or requests find it empty
        # meanwhile and reserve on their own. A pool of one is not short either: the request that finds it
        # empty doubles it (see SpareReservations.take), so steady traffic grows it to where it can wait.
        needed_now = 2 * len(pool.spares) < pool.depth - 1
        try:
            call = calls.store.reserve_spares([spare.spare_id for spare in batch], _margined(batch[0].lines), now,
                                              now + self._lease_s, SPARE_ROOM, needed_now)
        except Exception as exc:             # nothing was sent; a request waiting for the batch goes on
            self.spares.not_made(pool)
            if not isinstance(exc, StoreError):
                log.error("asking for spare reservations failed: %r", exc)
            return
        future = asyncio.ensure_future(calls.bounded(call))
        calls.keep(future)
        future.add_done_callback(functools.partial(self._answered, pool, batch))

    def _answered(self, pool: SparePool, batch: list[Spare], call: asyncio.Future[ReserveOutcome]) -> None:
        answered = not call.cancelled() and call.exception() is None
        if answered and not call.result().ok:
            self.spares.not_made(pool, refused=True)
        elif answered and not self._stopped:
            pool.used = call.result().used or pool.used
            self.spares.made(pool, batch)
            self.reserve_ahead(pool, batch[0].lines, batch[0].amount)   # the pool deepened meanwhile
        else:   # close() stopped waiting for them, or the reply was lost after the store applied them
            self.spares.not_made(pool)
            for spare in batch:
                self.release(spare)

    async def reclaim(self, pool: SparePool, amount: Charge) -> tuple[Spare | None, bool]:
        """After the store refused a request of `pool`: a spare of it that covers `amount`, else whether this
        replica's spares on the same counters were given back (then the store may have room now)."""
        self._calls.flush()                  # a batch on its way that waits for company: now
        spare, held = await self.spares.reclaim(pool, amount)
        if spare is not None or not held:
            return spare, False
        releases = [self.release(spare) for spare in held]
        self._calls.flush()                  # the request waits for them
        # kept to their end if the client leaves meanwhile: a spare must never linger
        await asyncio.shield(asyncio.gather(*releases, return_exceptions=True))
        return None, True

    def release(self, spare: Spare) -> asyncio.Task[None]:
        """Give a spare back to the store, in the background; journaled when the store fails."""
        calls = self._calls
        assert calls.store is not None
        try:
            call = calls.store.release(spare.spare_id, self._clock.now())
        except StoreError as exc:
            return calls.spawn(self._not_given_back(spare, exc))
        return calls.spawn(self._give_back(spare, call))

    async def _give_back(self, spare: Spare, call: Awaitable[bool]) -> None:
        try:
            await self._calls.bounded(call)
        except (StoreError, TimeoutError) as exc:
            await self._not_given_back(spare, exc)

    async def _not_given_back(self, spare: Spare, exc: BaseException) -> None:
        self._outage.mark_down(exc)
        try:                                 # replayed as a release when the store is back (within the lease)
            await self._outage.append_journal(spare.spare_id, spare.lines, Charge(), None, "release")
        except OSError:
            log.exception("journaling the release of spare %s failed", spare.spare_id)

    def stop(self) -> None:
        """Ask for no more spares: batches on their way land, then every spare is given back (`drain`)."""
        self._stopped = True

    def drain(self) -> None:
        """Give back every spare not taken."""
        self.spares.drain()
