"""ResponseCache: whether a request is answered from the cache, and keeping the answers that may be kept.

    lookup   the model is not cached -> None (nothing is looked up or counted)
             Cache-Control no-cache / no-store -> `bypass` (no-cache still keeps its fresh answer)
             an identical request in flight here -> wait for its answer (a hit when it lands with one)
             this replica holds it in memory, or the store has it fresh -> `hit` (a stream gets it as SSE)
             otherwise -> `miss` (`error` when the store failed: a miss all the same), and the request
             leads a flight that identical requests arriving now will wait on
    finish   the leader's answer (None: nothing to keep) lands for whoever waits; a kept answer is
             written to the store in the background (in memory it only replaces an entry held there:
             this replica holds what its hits read, see memory)

A cache store that fails or is slow never fails a request: the lookup is a miss and the write is dropped,
each reported to `on_store_error`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway.cache.control import control_of
from gateway.cache.entry import CacheEntry, decode, encode
from gateway.cache.flights import Flight, Flights
from gateway.cache.keys import cache_key, scope_identity
from gateway.cache.memory import MemoryFront, front_bytes
from gateway.cache.store import CacheStore
from gateway.clock import Clock
from gateway.config.model import CacheConfig, CallerIdentity
from gateway.domain.pricing import Usage

__all__ = ["Lookup", "ResponseCache", "HIT", "MISS", "BYPASS", "ERROR"]

log = logging.getLogger("gateway.cache")
HIT, MISS, BYPASS, ERROR = "hit", "miss", "bypass", "error"
T = TypeVar("T")
MAX_MODELS = 1024    # client model names remembered per config (they come from clients)


@dataclass(slots=True)
class Lookup:
    """What the cache said about one request."""

    key: str
    result: str                          # hit | miss | bypass | error
    write: bool                          # its answer may be kept
    entry: CacheEntry | None = None      # a hit's answer
    events: bytes | None = None          # a streamed hit's answer as SSE events
    flight: Flight | None = None         # identical requests wait on this request's answer


class ResponseCache:
    """Lookups and writes of answers in `store` (None: nothing is cached)."""

    def __init__(self, store: CacheStore | None, clock: Clock, timeout_s: float) -> None:
        self.store = store
        self.clock = clock
        self.timeout_s = timeout_s
        self.flights = Flights()
        self.memory = MemoryFront()
        self.on_store_error: list[Callable[[str], None]] = []
        self._writes: set[asyncio.Future[None]] = set()
        self._cached: tuple[CacheConfig | None, dict[str, bool]] = (None, {})

    def caches(self, config: CacheConfig, model: str) -> bool:
        """Whether answers for client model `model` are cached (remembered per config)."""
        if not config.models or self.store is None:
            return False
        known, answers = self._cached
        if known is not config or len(answers) >= MAX_MODELS:
            answers = {}
            self._cached = (config, answers)
            self.store.expect_ttl(config.ttl_s)
        cached = answers.get(model)
        if cached is None:
            cached = answers[model] = config.caches(model)
        return cached

    async def lookup(self, config: CacheConfig, caller: CallerIdentity, endpoint: str, model: str,
                     payload: dict[str, Any], stream: bool, wants_usage: bool,
                     cache_control: str | None) -> Lookup | None:
        """The cache's answer for a request; None when its model is not cached."""
        if not self.caches(config, model):
            return None
        key = cache_key(endpoint, model, scope_identity(config.scope, caller), payload)
        flights = self.flights
        if cache_control is not None:
            control = control_of(cache_control)
            if not control.read:
                return Lookup(key, BYPASS, control.write, flight=flights.lead(key) if control.write else None)
        result = MISS
        waiting = flights.waiting_on(key)
        if waiting is None:
            now = self.clock.now()
            entry = self.memory.get(key, now)
            if entry is None and self.store.may_hold(key, now):    # type: ignore[union-attr]
                entry, result = await self._read(key, config, now)
                waiting = flights.waiting_on(key)     # another request may have led while this one read
            if entry is not None:
                hit = self._hit(key, entry, stream, wants_usage)
                if hit is not None:
                    return hit
        if waiting is not None:
            entry = await flights.follow(waiting)
            if entry is not None:            # asked for again while it was fetched: held, its replays with it
                self.memory.hold(key, entry, self.clock.now(), front_bytes(config.max_bytes))
                hit = self._hit(key, entry, stream, wants_usage)
                if hit is not None:
                    return hit
        return Lookup(key, result, True, flight=flights.lead(key))

    def held_hit(self, key: str, stream: bool, wants_usage: bool) -> Lookup | None:
        """A hit on what this replica holds in memory under `key` (no store call), or None; None too while a
        request for `key` is in flight (a `no-cache` refresh: `lookup` waits for its answer)."""
        if self.flights.waiting_on(key) is not None:
            return None
        entry = self.memory.get(key, self.clock.now())
        return None if entry is None else self._hit(key, entry, stream, wants_usage)

    def _hit(self, key: str, entry: CacheEntry, stream: bool, wants_usage: bool) -> Lookup | None:
        """A hit on `entry` (as SSE for a stream); None when it has no stream form."""
        if not stream:
            return Lookup(key, HIT, False, entry)
        events = self.memory.replay(key, entry, wants_usage)
        return None if events is None else Lookup(key, HIT, False, entry, events)

    async def _read(self, key: str, config: CacheConfig, now: float) -> tuple[CacheEntry | None, str]:
        """The fresh entry the store holds under `key` (None: a miss), held in memory from now on; and `miss`,
        or `error` when the store failed."""
        assert self.store is not None
        try:
            get = self.store.get(key, now)
            data = await (get if self.store.bounds_time else self._bounded(get))
        except Exception as exc:             # any failure of the cache is a miss, never the request's
            self._failed("get", exc)
            return None, ERROR
        entry = decode(data) if data is not None else None
        if entry is None or entry.expires_at <= now:
            return None, MISS
        self.memory.put(key, entry, now, front_bytes(config.max_bytes))
        return entry, MISS

    def finish(self, lookup: Lookup, config: CacheConfig, answer: bytes | None, usage: Usage,
               cost_nano: int) -> None:
        """The request's answer (None: nothing to keep) lands for whoever waits and, if kept, is written."""
        flight = lookup.flight
        if answer is not None and lookup.write:
            now = self.clock.now()
            entry = CacheEntry(answer, usage, cost_nano, now, now + config.ttl_s)
            data = encode(entry)
            if len(data) <= config.max_entry_bytes:
                if flight is not None:
                    flight.land(entry)
                if lookup.result == BYPASS:   # a no-cache refresh: what any request holds is stale now
                    self.memory.put(lookup.key, entry, now, front_bytes(config.max_bytes))
                else:
                    self.memory.refresh(lookup.key, entry, now, front_bytes(config.max_bytes))
                self._write(lookup.key, data, entry, config.max_bytes, flight)
                return
        if flight is not None:
            flight.land(None)
            self.flights.clear(lookup.key, flight)

    def _write(self, key: str, data: bytes, entry: CacheEntry, max_bytes: int, flight: Flight | None) -> None:
        """Start writing the entry: a store call already on its way is kept as it is, a coroutine as a task."""
        assert self.store is not None
        try:
            call = self.store.put(key, data, entry.created_at, entry.expires_at, max_bytes)
        except Exception as exc:
            call = None
            self._not_written(key, entry, max_bytes, exc)
        work = call if isinstance(call, asyncio.Future) else asyncio.ensure_future(self._bounded(call))
        self._writes.add(work)
        work.add_done_callback(functools.partial(self._written, key, entry, max_bytes, flight))

    async def _bounded(self, call: Awaitable[T] | None) -> T | None:
        """`call` within the store's timeout."""
        if call is None:
            return None
        async with asyncio.timeout(self.timeout_s):
            return await call

    def _written(self, key: str, entry: CacheEntry, max_bytes: int, flight: Flight | None,
                 work: asyncio.Future[None]) -> None:
        """A write ended (its failure counted); the flight it kept visible is forgotten."""
        self._writes.discard(work)
        if not work.cancelled() and work.exception() is not None:
            self._not_written(key, entry, max_bytes, work.exception() or Exception())
        if flight is not None:
            self.flights.clear(key, flight)

    def _not_written(self, key: str, entry: CacheEntry, max_bytes: int, exc: BaseException) -> None:
        """The store did not take the entry: count it, and hold it in memory, so that this replica still
        answers it while the store is out (no other does)."""
        self._failed("put", exc)
        self.memory.hold(key, entry, self.clock.now(), front_bytes(max_bytes))

    def _failed(self, operation: str, exc: BaseException) -> None:
        log.warning("response cache %s failed (%s): served as a miss", operation, type(exc).__name__)
        for listener in self.on_store_error:
            listener(operation)

    async def written(self) -> None:
        """Wait until the writes started so far are done (tests; shutdown)."""
        if self._writes:
            await asyncio.wait(list(self._writes))

    async def close(self) -> None:
        """Finish the writes under way (within the timeout), then close the store."""
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=self.timeout_s)
        if self.store is not None:
            await self.store.close()
