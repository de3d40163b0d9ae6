"""A replica's hot entries in memory, in front of the shared store: a repeated hit costs no store call.

An entry is held once a hit read it, from the store or from an identical request in flight, not because
this replica wrote it: most answers are never asked for again, and holding each one a miss writes would
cost every miss a put and churn the memory of answers that are asked for again. A miss's write replaces
an entry already held, a `no-cache` refresh's is held (whatever was held is stale), and an entry the
store failed to take is held, so that this replica still answers it while the store is out; none of
these replaces an answer stored after it.

Bounded in bytes (least recently used first out) and in time: an entry is held for at most HOLD_S
seconds (and never past its own expiry), so an entry another replica refreshed (`Cache-Control:
no-cache`) is served from here for at most that long. A held entry also keeps its SSE replays (with and
without the usage chunk) once a streamed hit made them, counted in its bytes: the next streamed hits
send them as they are.
"""

from __future__ import annotations

from collections import OrderedDict

from gateway.cache.entry import CacheEntry
from gateway.cache.replay import replay_events

__all__ = ["HOLD_S", "ENTRY_OVERHEAD", "MemoryFront", "front_bytes"]

HOLD_S = 10.0
ENTRY_OVERHEAD = 256        # bytes counted per entry beside its answer (the key, the tuple, the dict slot)
MAX_FRONT_BYTES = 16 * 1024 * 1024


def front_bytes(max_bytes: int) -> int:
    """The memory a replica holds entries in: a sixteenth of the cache's bound, 16 MiB at most."""
    return min(max_bytes // 16, MAX_FRONT_BYTES)


class _Held:
    """An entry, the time it is held until, its replays made so far (by wants_usage) and its bytes."""

    __slots__ = ("entry", "until", "replays", "size")

    def __init__(self, entry: CacheEntry, until: float) -> None:
        self.entry, self.until = entry, until
        self.replays: dict[bool, bytes | None] = {}
        self.size = len(entry.body) + ENTRY_OVERHEAD


class MemoryFront:
    """Entries by key, each with the time it is held until, least recently used first."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, _Held] = OrderedDict()
        self.bytes = 0
        self._limit = MAX_FRONT_BYTES      # the last `put`'s

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> CacheEntry | None:
        """The entry held under `key` while it is fresh (a stale one is dropped)."""
        held = self._entries.get(key)
        if held is None:
            return None
        if now >= held.until:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return held.entry

    def put(self, key: str, entry: CacheEntry, now: float, limit: int) -> None:
        """Hold `entry` (replacing one under `key`); the least recently used go while past `limit` bytes."""
        self._limit = limit
        held = _Held(entry, min(entry.expires_at, now + HOLD_S))
        if held.size > limit:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = held
        self.bytes += held.size
        self._trim()

    def hold(self, key: str, entry: CacheEntry, now: float, limit: int) -> None:
        """Hold `entry` under `key` unless it, or an answer stored after it, is held there already (the one
        held keeps its replays)."""
        held = self._entries.get(key)
        if held is None or (held.entry is not entry and held.entry.created_at < entry.created_at):
            self.put(key, entry, now, limit)

    def refresh(self, key: str, entry: CacheEntry, now: float, limit: int) -> None:
        """Replace the entry held under `key`, if one is (a newer answer was written): hold no other."""
        if key in self._entries:
            self.put(key, entry, now, limit)

    def replay(self, key: str, entry: CacheEntry, wants_usage: bool) -> bytes | None:
        """`entry`'s SSE events (see replay_events), kept with it while it is held under `key`."""
        held = self._entries.get(key)
        if held is None or held.entry is not entry:
            return replay_events(entry.body, entry.usage, wants_usage)
        if wants_usage in held.replays:
            return held.replays[wants_usage]
        events = held.replays[wants_usage] = replay_events(entry.body, entry.usage, wants_usage)
        added = len(events) if events is not None else 0
        held.size += added
        self.bytes += added
        self._trim()
        return events

    def _trim(self) -> None:
        while self.bytes > self._limit:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        self.bytes -= self._entries.pop(key).size
