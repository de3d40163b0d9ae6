"""A replica's hot entries in memory, in front of the shared store: a repeated hit costs no store call.

Bounded in bytes (least recently used first out) and in time: an entry is held for at most HOLD_S
seconds (and never past its own expiry), so an entry another replica refreshed (`Cache-Control:
no-cache`) is served from here for at most that long.
"""

from __future__ import annotations

from collections import OrderedDict

from gateway.cache.entry import CacheEntry

__all__ = ["HOLD_S", "ENTRY_OVERHEAD", "MemoryFront", "front_bytes"]

HOLD_S = 10.0
ENTRY_OVERHEAD = 256        # bytes counted per entry beside its answer (the key, the tuple, the dict slot)
MAX_FRONT_BYTES = 16 * 1024 * 1024


def front_bytes(max_bytes: int) -> int:
    """The memory a replica holds entries in: a sixteenth of the cache's bound, 16 MiB at most."""
    return min(max_bytes // 16, MAX_FRONT_BYTES)


class MemoryFront:
    """Entries by key, each with the time it is held until, least recently used first."""

    def __init__(self) -> None:
        self._entries: OrderedDict[str, tuple[CacheEntry, float]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, now: float) -> CacheEntry | None:
        """The entry held under `key` while it is fresh (a stale one is dropped)."""
        held = self._entries.get(key)
        if held is None:
            return None
        if now >= held[1]:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return held[0]

    def put(self, key: str, entry: CacheEntry, now: float, limit: int) -> None:
        """Hold `entry` (replacing one under `key`); the least recently used go while past `limit` bytes."""
        size = len(entry.body) + ENTRY_OVERHEAD
        if size > limit:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (entry, min(entry.expires_at, now + HOLD_S))
        self.bytes += size
        while self.bytes > limit:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        entry, _ = self._entries.pop(key)
        self.bytes -= len(entry.body) + ENTRY_OVERHEAD
