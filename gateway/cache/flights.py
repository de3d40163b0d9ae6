"""Single-flight: identical requests in flight at once on one replica make one upstream call.

The first request for a key leads; the others wait for its answer. When it lands they are answered from
it (charged nothing: they are cache hits); when it does not (an error, a truncated stream, an answer not
kept) each goes on to make its own call. A landed answer stays visible here until the store has it, so
a request arriving meanwhile does not miss in the store and call the upstream again.
"""

from __future__ import annotations

import asyncio

from gateway.cache.entry import CacheEntry

__all__ = ["Flight", "Flights"]


class Flight:
    """One answer being fetched: its followers wait on a future, made for the first of them (most answers
    have none)."""

    __slots__ = ("landed", "entry", "_future")

    def __init__(self) -> None:
        self.landed = False
        self.entry: CacheEntry | None = None
        self._future: asyncio.Future[CacheEntry | None] | None = None

    def land(self, entry: CacheEntry | None) -> None:
        """Hand the leader's answer (None: nothing to share) to whoever waits (once)."""
        if not self.landed:
            self.landed, self.entry = True, entry
            if self._future is not None:
                self._future.set_result(entry)

    def waiter(self) -> asyncio.Future[CacheEntry | None]:
        """The future that gets the answer when the flight lands (not landed yet)."""
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        return self._future


class Flights:
    """The answers being fetched, by cache key."""

    def __init__(self) -> None:
        self._flights: dict[str, Flight] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def waiting_on(self, key: str) -> Flight | None:
        """The flight of `key` in the air (or landed, its answer not yet stored), if any."""
        return self._flights.get(key)

    def lead(self, key: str) -> Flight | None:
        """A new flight for `key`, led by the caller; None when one is already in the air."""
        if key in self._flights:
            return None
        flight = self._flights[key] = Flight()
        return flight

    @staticmethod
    async def follow(flight: Flight) -> CacheEntry | None:
        """The answer the flight lands with (a follower that leaves does not cancel it)."""
        if flight.landed:
            return flight.entry
        return await asyncio.shield(flight.waiter())

    def clear(self, key: str, flight: Flight) -> None:
        """Forget a landed flight (its answer is in the store now, or was never kept)."""
        if self._flights.get(key) is flight:
            del self._flights[key]
