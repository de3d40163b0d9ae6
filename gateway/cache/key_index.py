"""Which cache keys the shared store may hold, known without asking it: a miss that is not in the index
costs no store read.

Fed by this replica's own writes and by what Redis tells it of everyone's (see redis_tracking); while it
is not `ready` (not yet filled, or the news from Redis stopped), every key may be held. It only ever
errs one way: a key it holds may be gone (the read says so), but a key written while it was ready is in
it for a whole time to live. Keys are kept as their Python hash: two keys that collide cost one read.

Keys sit in time buckets, so old ones go a bucket at a time: a key stays for at least `horizon_s` (the
longest time to live an entry is written with, here or in the config) after it was last added. A key
Redis expires or evicts is news too, so it is added again: the index holds up to about twice the keys
written within a time to live. Past MAX_KEYS it stops taking keys and answers "may hold" for every key
until those it could not take have expired.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterable

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
        self._hashes: set[int] = set()     # the newest bucket's, taking keys until `_rotate_at`
        self._rotate_at = -math.inf
        self._older = 0                    # hashes in the buckets before the newest
        self._unsure_until = 0.0           # keys were left out: every key may be held until then

    def __len__(self) -> int:
        return self._older + len(self._hashes)

    def may_hold(self, key: str, now: float) -> bool:
        """False only when the store cannot hold `key`: the index is ready and never saw it."""
        if not self.ready or now < self._unsure_until:
            return True
        fingerprint = hash(key)
        for _, hashes in self._buckets:
            if fingerprint in hashes:
                return True
        return False

    def add(self, key: str, now: float, ttl_s: float | None = None) -> None:
        """`key` was written (or changed) at `now`, for `ttl_s` (None: for at most the horizon)."""
        if ttl_s is not None:
            self.expect_ttl(ttl_s)
        if now >= self._rotate_at:
            self._rotate(now)
        fingerprint, hashes = hash(key), self._hashes
        if fingerprint in hashes:
            return
        if self._older + len(hashes) >= self.max_keys:
            self._unsure_until = max(self._unsure_until, now + self._horizon)
            return
        hashes.add(fingerprint)

    def expect_ttl(self, ttl_s: float) -> None:
        """Entries may be written for `ttl_s` from now on: keys are kept at least that long (never shorter)."""
        if ttl_s + _SLACK_S > self._horizon:
            self._horizon = ttl_s + _SLACK_S

    def add_all(self, keys: Iterable[str], now: float) -> None:
        """`add` each of `keys` (Redis's news comes in batches)."""
        if now >= self._rotate_at:
            self._rotate(now)
        hashes = self._hashes
        room = self.max_keys - self._older - len(hashes)
        fingerprints = set(map(hash, keys)) - hashes
        if len(fingerprints) > room:     # past the bound: unsure instead
            self._unsure_until = max(self._unsure_until, now + self._horizon)
            fingerprints = set(itertools.islice(fingerprints, max(0, room)))
        hashes |= fingerprints

    def clear(self) -> None:
        """Forget every key (the store was emptied, or the index is to be filled again)."""
        self._buckets.clear()
        self._hashes = set()
        self._rotate_at = -math.inf
        self._older = 0

    def _rotate(self, now: float) -> None:
        """A new bucket for keys added from `now`, once the buckets past the horizon are dropped."""
        width = self._horizon / BUCKETS
        buckets = self._buckets
        self._older += len(self._hashes)
        while buckets and buckets[0][0] + width + self._horizon <= now:
            self._older -= len(buckets.popleft()[1])
        self._hashes = set()
        buckets.append((now, self._hashes))
        self._rotate_at = now + width
