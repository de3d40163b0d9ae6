"""Requests served from the cache before, known again by their bytes: an identical request under the same
config skips authentication, parsing, routing and the cache key, most of what a hit costs besides sending it.

A request is remembered only once it was served as a hit on the full path, and only when nothing on that
path can come out differently for the same bytes: its route is a plain one (no split, canary or rules) and
no rate window or in-flight counter holds its hits (those take a store call per request). What identifies
it is everything the path reads of the request (`wire_key`): the endpoint, the client's token, the end
user and session headers, Cache-Control, Content-Type and the body. A config reload forgets every request.
"""

from __future__ import annotations

from typing import NamedTuple

from aiohttp import web

from gateway.config.model import CallerIdentity, Settings
from gateway.domain.end_user import SESSION_HEADER, USER_HEADER
from gateway.domain.request import Endpoint, ProxyRequest
from gateway.http.auth import TokenReader

__all__ = ["Ticket", "RepeatHits", "WireKey", "wire_key", "MAX_REQUESTS", "MAX_BODY_BYTES"]

MAX_REQUESTS = 4096
MAX_BODY_BYTES = 16 * 1024 * 1024   # the remembered bodies together (the oldest go first past either bound)
WireKey = tuple[str, "str | None", "str | None", "str | None", "str | None", "str | None", bytes]


class Ticket(NamedTuple):
    """What the full path made of a request that it served from the cache."""

    caller: CallerIdentity
    req: ProxyRequest
    route: str
    key: str                 # the cache key


def wire_key(request: web.Request, endpoint: Endpoint, read_token: TokenReader, body: bytes) -> WireKey:
    """Everything the path of a cache hit reads of `request` (see gateway.http.proxy.serve)."""
    headers = request.headers
    return (endpoint.kind, read_token(request), headers.get(USER_HEADER), headers.get(SESSION_HEADER),
            headers.get("Cache-Control"), headers.get("Content-Type"), body)


class RepeatHits:
    """Tickets by wire key, under one Settings at a time, within MAX_REQUESTS and MAX_BODY_BYTES."""

    def __init__(self, max_requests: int = MAX_REQUESTS, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self._settings: Settings | None = None
        self._tickets: dict[WireKey, Ticket] = {}
        self._bytes = 0
        self._max_requests, self._max_bytes = max_requests, max_body_bytes

    def __len__(self) -> int:
        return len(self._tickets)

    def find(self, settings: Settings, wire: WireKey) -> Ticket | None:
        """The ticket of an identical request served under `settings`, or None."""
        if settings is not self._settings:
            return None
        return self._tickets.get(wire)

    def remember(self, settings: Settings, wire: WireKey, ticket: Ticket) -> None:
        """Keep `ticket` for requests identical to `wire` (forgetting those of an older config)."""
        if settings is not self._settings:
            self._settings, self._tickets, self._bytes = settings, {}, 0
        size = len(wire[-1])
        if wire in self._tickets or size > self._max_bytes:
            return
        tickets = self._tickets
        while tickets and (len(tickets) >= self._max_requests or self._bytes + size > self._max_bytes):
            oldest = next(iter(tickets))
            self._bytes -= len(oldest[-1])
            del tickets[oldest]
        tickets[wire] = ticket
        self._bytes += size
