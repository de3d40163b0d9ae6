"""Which cache keys the shared store may hold, known without asking it: a miss that is not in the index
costs no store read.

Fed by this replica's own writes and by what Redis tells it of everyone's (see redis_tracking); while it
is not `ready` (not yet filled, or the news from Redis stopped), every key may be held. It only ever
errs one way: a key it holds may be gone (the read says so), but a key written while it was ready is in
it for a whole time to live. Keys are kept as their Python hash: two keys that collide cost one read.

Keys sit in time buckets, so old ones go a bucket at a time: a key stays for at least `horizon_s` (the
longest time to live an entry is written with) after it was last added. Past MAX_KEYS the index stops
taking keys and answers "may hold" for every key until those it could not take have expired.
"""

from __future__ import annotations

from collections import deque

__all__ = ["KeyIndex", "MAX_KEYS", "BUCKETS"]

MAX_KEYS = 1 << 19           # ~34 MiB of hashes; more keys written within a time to live: the store is read
BUCKETS = 4                  # buckets per horizon: a key is kept at most a quarter horizon longer than needed
_SLACK_S = 2.0               # Redis keeps an entry a second past its expiry (see redis_store)


class KeyIndex:
    """Hashes of the keys the store may hold, in buckets of `horizon_s / BUCKETS` seconds."""

    def __init__(self, horizon_s: float, max_keys: int = MAX_KEYS) -> None:
        self.ready = False
        self.max_keys = max_keys
        self._horizon = horizon_s + _SLACK_S
        self._buckets: deque[tuple[float, set[int]]] = deque()    # (start, hashes), oldest first
        self._size = 0
        self._unsure_until = 0.0      # keys were left out: every key may be held until then

    def __len__(self) -> int:
        return self._size

    def may_hold(self, key: str, now: float) -> bool:
        """False only when the store cannot hold `key`: the index is ready and never saw it."""
        if not self.ready or now < self._unsure_until:
            return True
        fingerprint = hash(key)
        return any(fingerprint in hashes for _, hashes in self._buckets)

    def add(self, key: str, now: float, ttl_s: float | None = None) -> None:
        """`key` was written (or changed) at `now`, for `ttl_s` (None: for at most the horizon)."""
        if ttl_s is not None and ttl_s + _SLACK_S > self._horizon:
            self._horizon = ttl_s + _SLACK_S
        hashes = self._current(now)
        if self._size >= self.max_keys:
            self._unsure_until = max(self._unsure_until, now + self._horizon)
            return
        size = len(hashes)
        hashes.add(hash(key))
        self._size += len(hashes) - size

    def clear(self) -> None:
        """Forget every key (the store was emptied, or the index is to be filled again)."""
        self._buckets.clear()
        self._size = 0

    def _current(self, now: float) -> set[int]:
        """The bucket keys added at `now` go to, once the buckets past the horizon are dropped."""
        width = self._horizon / BUCKETS
        buckets = self._buckets
        while buckets and buckets[0][0] + width + self._horizon <= now:
            self._size -= len(buckets.popleft()[1])
        if not buckets or now >= buckets[-1][0] + width:
            buckets.append((now, set()))
        return buckets[-1][1]
