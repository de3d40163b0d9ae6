"""A cache entry: the whole answer a client got and its usage, never a header or a key; and its byte codec.

    b"GWC1" <header JSON> b"\n" <answer>

The header holds the usage counts, what the answer cost when it was bought (nano-USD: what a hit saves),
and when it was stored and stops being served (the gateway's clock, so an injected clock moves expiry).
"""

from __future__ import annotations

from typing import NamedTuple

import orjson

from gateway.domain.pricing import Usage

__all__ = ["CacheEntry", "encode", "decode"]

_MAGIC = b"GWC1"


class CacheEntry(NamedTuple):
    """One cached answer."""

    body: bytes              # the whole JSON answer (a stream's, put back together)
    usage: Usage
    cost_nano: int           # what the answer was charged when it was bought
    created_at: float        # epoch seconds
    expires_at: float

    def age(self, now: float) -> int:
        """Whole seconds since the answer was stored (the HTTP `age` header)."""
        return max(0, int(now - self.created_at))


def encode(entry: CacheEntry) -> bytes:
    """The entry as stored."""
    usage = entry.usage
    header = orjson.dumps([usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, entry.cost_nano,
                           entry.created_at, entry.expires_at])
    return b"".join((_MAGIC, header, b"\n", entry.body))


def decode(data: bytes) -> CacheEntry | None:
    """The entry stored as `data`; None for bytes of another format or version (read as a miss)."""
    if not data.startswith(_MAGIC):
        return None
    end = data.find(b"\n", len(_MAGIC))
    if end < 0:
        return None
    try:
        prompt, completion, cached, cost, created, expires = orjson.loads(data[len(_MAGIC):end])
    except (orjson.JSONDecodeError, ValueError, TypeError):
        return None
    return CacheEntry(data[end + 1:], Usage(prompt, completion, cached), cost, created, expires)
