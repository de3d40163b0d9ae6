"""Spare reservations: the next requests' budget, reserved before they arrive.

Reserving costs a store round trip before the upstream call (about 0.2 ms on a loopback Redis, more
across a network). So a replica keeps, per set of budget counters, a few spare reservations made in
the background with the worst case of the last request on those counters: a request whose worst case
fits takes one at once, and the engine reserves more off the request's path, several in one store
call. How many a pool keeps follows the traffic: one at first, twice as many when requests find none
while more are on their way (once per batch, up to MAX_DEPTH), half as many each time spares go unused
or the store refuses them (and none are asked for during `idle_s` after a refusal).

A spare is an ordinary reservation in the store, with its own id and lease: it counts against the
limits like a request in flight, so spares never let spend pass a limit. What they could cost is
headroom, so spares are made only while every limit they hold on has room for SPARE_ROOM - 1 more
worst cases beside them (near a limit there are none); spares not taken are released after `idle_s`,
and a request the store refuses first takes back every spare of its replica that holds on one of its
counters. A replica that crashes turns its spares into spend when their leases end, as it does its
requests in flight.

A pool on rate windows (see gateway.budget.slots.SPARE_PERS) ends with the bucket its spares are counted
in: its spares are given back then, so a request is always counted in the bucket it was admitted in. It
keeps what the store last said the windows hold (`used`), for the x-ratelimit-* headers of the requests
it serves.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
from collections import deque
from collections.abc import Callable, Sequence
from typing import NamedTuple

from gateway.budget.slots import Slot
from gateway.budget.store import CounterKey, ReserveLine
from gateway.domain.pricing import Charge

__all__ = ["SPARE_ROOM", "MAX_DEPTH", "Spare", "SparePool", "SpareReservations"]

SPARE_ROOM = 4     # spares are made only while every limit has room for this many more of their amount
MAX_DEPTH = 32     # spares one pool keeps at most
MAX_POOLS = 4096   # slot sets kept (they change with each window); more are released together


class Spare(NamedTuple):
    """A reservation held in the store under `spare_id`, not yet taken by a request."""

    spare_id: str
    lines: tuple[ReserveLine, ...]
    amount: Charge
    made_at: float                    # clock.monotonic() when it was asked for


class SparePool:
    """The spares of one set of budget counters, oldest first, and the batch being made."""

    __slots__ = ("counters", "spares", "depth", "grown", "timer", "making", "paused_until", "ends_at", "used",
                 "keys", "headers")

    def __init__(self, counters: frozenset[CounterKey], ends_at: float = math.inf,
                 keys: tuple[int, tuple[object, ...]] = (0, ())) -> None:
        self.counters = counters
        self.ends_at = ends_at                            # monotonic: its spares go back then (rate windows)
        self.used: tuple[int, ...] = ()                   # the rate windows' use the store last reported
        self.headers: tuple[object, int, dict[str, str] | None] | None = None   # x-ratelimit-* of (used, second)
        self.keys = keys                                  # where SpareReservations files it
        self.spares: deque[Spare] = deque()
        self.depth = 1                                    # how many to keep
        self.grown = False                                # the depth grew while this batch is on its way
        self.timer: asyncio.TimerHandle | None = None     # releases spares gone idle
        self.making: asyncio.Future[None] | None = None   # done when the batch asked for is answered
        self.paused_until = 0.0                           # monotonic: no batch before (after a refusal)

    def wanted(self, now: float) -> int:
        """How many spares to ask for now: up to the depth; none while a batch is on its way or paused."""
        if self.making is not None or len(self.spares) >= self.depth or now < self.paused_until \
                or now >= self.ends_at:
            return 0
        return self.depth - len(self.spares)


class SpareReservations:
    """The spare pools of one replica; `release` gives back the store's hold on a spare not taken."""

    def __init__(self, idle_s: float, monotonic: Callable[[], float], release: Callable[[Spare], object]) -> None:
        self.idle_s = idle_s
        self._monotonic = monotonic
        self._release = release
        self._pools: dict[int, tuple[tuple[Slot, ...], SparePool]] = {}
        self._by_counters: dict[tuple[object, ...], SparePool] = {}
        self._ids = itertools.count()
        self._prefix = f"spare-{os.getpid()}-{os.urandom(4).hex()}-"
        self._loop: asyncio.AbstractEventLoop | None = None

    def pool(self, slots: tuple[Slot, ...], ends_in: float = math.inf) -> SparePool:
        """The pool of the counters `slots` reserve on (slots of every caller and model share it); one made
        now ends in `ends_in` seconds (when a rate window's bucket does)."""
        cached = self._pools.get(id(slots))
        if cached is not None and cached[0] is slots:
            return cached[1]
        if len(self._pools) >= MAX_POOLS:
            self.drain()
        counters = tuple((slot.counter, slot.limits, slot.expires_at) for slot in slots)
        pool = self._by_counters.get(counters)
        if pool is None:
            self._end_pools()
            pool = self._by_counters[counters] = SparePool(frozenset(slot.counter for slot in slots),
                                                           self._monotonic() + ends_in, (id(slots), counters))
        self._pools[id(slots)] = (slots, pool)   # holding `slots` keeps its id from being reused
        return pool

    def take(self, pool: SparePool, amount: Charge) -> Spare | None:
        """The pool's oldest spare if it covers `amount` in every unit and is fresh (stale ones are released).

        Finding none while a batch is on its way means the traffic outruns the pool: it keeps more.
        """
        spares = pool.spares
        if not spares:
            if pool.making is not None and not pool.grown and pool.depth < MAX_DEPTH:
                pool.depth *= 2
                pool.grown = True
            return None
        spare = spares[0]
        now = self._monotonic()
        if now - spare.made_at >= self.idle_s or now >= pool.ends_at:
            self._release_idle(pool)
            return None
        held = spare.amount
        if amount.usd_nano > held.usd_nano or amount.tokens > held.tokens or amount.requests > held.requests:
            return None
        return spares.popleft()

    def new_batch(self, pool: SparePool, lines: Sequence[ReserveLine], amount: Charge, count: int) -> list[Spare]:
        """`count` spares to ask the store for; the pool is `making` them until `made` or `not_made`."""
        pool.making = self._running_loop().create_future()
        pool.grown = False
        made_at, lines = self._monotonic(), tuple(lines)
        return [Spare(f"{self._prefix}{next(self._ids)}", lines, amount, made_at) for _ in range(count)]

    def made(self, pool: SparePool, batch: Sequence[Spare]) -> None:
        """The store holds `batch`: keep it for the next requests, released if unused for `idle_s`."""
        self.not_made(pool)
        pool.spares.extend(batch)
        if pool.timer is None:
            wait = min(self.idle_s, pool.ends_at - self._monotonic())
            pool.timer = self._running_loop().call_later(max(0.0, wait), self._release_idle, pool)

    def not_made(self, pool: SparePool, refused: bool = False) -> None:
        """The store's answer to the batch is in (`made` follows if it holds it); after a refusal the pool
        keeps half as many and asks for none during `idle_s`."""
        making, pool.making = pool.making, None
        if making is not None and not making.done():
            making.set_result(None)
        if refused:
            pool.depth = max(1, pool.depth // 2)
            pool.paused_until = self._monotonic() + self.idle_s

    async def reclaim(self, pool: SparePool, amount: Charge) -> tuple[Spare | None, list[Spare]]:
        """After the store refused a request of `pool`: a spare of it that covers `amount` (once the batches
        on their way are in), else every spare of this replica on one of its counters, to release before
        asking again."""
        sharing = [other for other in self._by_counters.values() if other.counters & pool.counters]
        paused_until = self._monotonic() + self.idle_s    # these counters are near a limit: no new spares
        for other in sharing:
            other.paused_until = paused_until
        making = [other.making for other in sharing if other.making is not None]
        if making:
            await asyncio.shield(asyncio.gather(*making))
        spare = self.take(pool, amount)
        if spare is not None:
            return spare, []
        held: list[Spare] = []
        for other in sharing:
            held += other.spares
            other.spares.clear()
        return None, held

    def drain(self) -> None:
        """Release every spare not taken (the gateway is stopping, or too many counter sets are kept)."""
        for pool in self._by_counters.values():
            self._give_back(pool, len(pool.spares))
        self._pools.clear()
        self._by_counters.clear()

    def _release_idle(self, pool: SparePool) -> None:
        """Release the spares older than `idle_s` and keep half as many from now on; check again later."""
        if pool.timer is not None:           # called by `take` before the timer fired
            pool.timer.cancel()
            pool.timer = None
        spares, now = pool.spares, self._monotonic()
        if now >= pool.ends_at:              # its bucket is over: no request will take these any more
            self._give_back(pool, len(spares))
            self._forget(pool)
            return
        idle = 0
        while idle < len(spares) and now - spares[idle].made_at >= self.idle_s:
            idle += 1
        if idle:
            self._give_back(pool, idle)
            pool.depth = max(1, pool.depth // 2)
        if spares:
            wait = max(0.0, min(spares[0].made_at + self.idle_s, pool.ends_at) - now)
            pool.timer = self._running_loop().call_later(wait, self._release_idle, pool)

    def _end_pools(self) -> None:
        """Give back the spares of the pools whose bucket is over (a new pool: one may just have ended)."""
        now = self._monotonic()
        for pool in [pool for pool in self._by_counters.values() if pool.ends_at <= now]:
            self._release_idle(pool)

    def _forget(self, pool: SparePool) -> None:
        """Drop an ended pool (a batch still on its way is released when it lands: see `made`)."""
        slots_id, counters = pool.keys
        if self._by_counters.get(counters) is pool:
            del self._by_counters[counters]
            self._pools.pop(slots_id, None)

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The running loop; the last one found while it runs (asyncio.get_running_loop makes a getpid
        system call on Python 3.11)."""
        loop = self._loop
        if loop is None or not loop.is_running():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _give_back(self, pool: SparePool, count: int) -> None:
        """Release the pool's `count` oldest spares."""
        for _ in range(count):
            self._release(pool.spares.popleft())
        if not pool.spares and pool.timer is not None:
            pool.timer.cancel()
            pool.timer = None
