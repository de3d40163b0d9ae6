"""Requests served from the cache before, known again on the wire: an identical request under the same
config skips authentication, parsing, routing and the cache key, most of what a hit costs besides sending it.

A request is remembered only once it was served as a hit on the full path, and only when nothing on that
path can come out differently for the same bytes: its route is a plain one (no split, canary or rules) and
no rate window or in-flight counter holds its hits (those take a store call per request). What identifies
it is everything the path reads of the request (`wire_key`): the endpoint, the client's token, the end
user and session headers, Cache-Control, Content-Type and the body (by its SHA-256: no prompt is kept).
A config reload forgets every request.
"""

from __future__ import annotations

import hashlib
from typing import Generic, NamedTuple, TypeVar

from aiohttp import web

from gateway.cache.service import HIT
from gateway.config.model import CallerIdentity, Settings
from gateway.domain.end_user import SESSION_HEADER, USER_HEADER
from gateway.domain.request import Endpoint, ProxyRequest
from gateway.http.auth import TokenReader
from gateway.observability.access_log import AccessRecord

__all__ = ["Ticket", "RepeatHits", "WireKey", "may_repeat", "wire_key", "ticket_for", "note_asked", "note_repeat",
           "ConfigTable", "MAX_REQUESTS", "MAX_BYTES", "MAX_BODY_BYTES"]

MAX_REQUESTS = 4096
MAX_BYTES = 4 * 1024 * 1024      # the remembered wire keys' header values together (the oldest go first)
MAX_BODY_BYTES = 64 * 1024       # a larger body is not remembered (it seldom arrives whole before it is served)
_OVERHEAD = 512                  # bytes counted per request beside its header values (tuples, digest, ticket)
WireKey = tuple[str, "str | None", "str | None", "str | None", "str | None", "str | None", bytes]
K = TypeVar("K")
V = TypeVar("V")


class Ticket(NamedTuple):
    """What the full path made of a request it served from the cache, as much as answering it again takes."""

    caller: CallerIdentity
    model: str
    stream: bool
    wants_usage: bool
    user: str | None
    session: str | None
    route: str
    key: str                 # the cache key


def ticket_for(caller: CallerIdentity, req: ProxyRequest, route: str, key: str) -> Ticket:
    """The ticket of a request the full path served from the cache under `key`."""
    return Ticket(caller, req.model, req.stream, req.wants_usage, req.user, req.session, route, key)


def note_asked(record: AccessRecord, asked: ProxyRequest | Ticket) -> None:
    """Record what the client asked for: its model, whether streamed, its end user and session."""
    record.model = record.requested_model = asked.model
    record.stream = asked.stream
    record.user, record.session = asked.user, asked.session


def note_repeat(record: AccessRecord, ticket: Ticket) -> None:
    """Record a request answered again from its ticket: as the full path recorded it, a cache hit."""
    record.caller = ticket.caller.name
    note_asked(record, ticket)
    record.route, record.cache = ticket.route, HIT


def may_repeat(request: web.Request) -> bool:
    """Whether `request` may be one remembered: its body is small and all here (reading it cannot wait, and
    what is hashed before the client is authenticated stays within MAX_BODY_BYTES)."""
    length = request.content_length
    return length is not None and length <= MAX_BODY_BYTES and request.content.is_eof()


def wire_key(request: web.Request, endpoint: Endpoint, read_token: TokenReader, body: bytes) -> WireKey:
    """Everything the path of a cache hit reads of `request` (see gateway.http.proxy.serve)."""
    headers = request.headers
    return (endpoint.kind, read_token(request), headers.get(USER_HEADER), headers.get(SESSION_HEADER),
            headers.get("Cache-Control"), headers.get("Content-Type"), hashlib.sha256(body).digest())


class ConfigTable(Generic[K, V]):
    """Values by key under one Settings at a time (a new config forgets all), within `max_items` and
    `max_bytes` (each put says its size), the oldest going first."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self._settings: Settings | None = None
        self._values: dict[K, tuple[V, int]] = {}
        self._bytes = 0
        self._max_items, self._max_bytes = max_items, max_bytes

    def __len__(self) -> int:
        return len(self._values)

    def get(self, settings: Settings, key: K) -> V | None:
        """The value kept under `key` for `settings` (None; a new config forgets all)."""
        if settings is not self._settings:
            self._forget(settings)
            return None
        held = self._values.get(key)
        return None if held is None else held[0]

    def put(self, settings: Settings, key: K, value: V, size: int) -> None:
        """Keep `value` under `key` (one already kept stays); one larger than the whole bound is not kept."""
        if settings is not self._settings:
            self._forget(settings)
        values = self._values
        if key in values or size > self._max_bytes:
            return
        while values and (len(values) >= self._max_items or self._bytes + size > self._max_bytes):
            self._bytes -= values.pop(next(iter(values)))[1]
        values[key] = (value, size)
        self._bytes += size

    def _forget(self, settings: Settings) -> None:
        self._settings, self._values, self._bytes = settings, {}, 0


class RepeatHits:
    """Tickets by wire key, under one Settings at a time, within MAX_REQUESTS and MAX_BYTES."""

    def __init__(self, max_requests: int = MAX_REQUESTS, max_bytes: int = MAX_BYTES) -> None:
        self._tickets: ConfigTable[WireKey, Ticket] = ConfigTable(max_requests, max_bytes)

    def __len__(self) -> int:
        return len(self._tickets)

    def find(self, settings: Settings, wire: WireKey) -> Ticket | None:
        """The ticket of an identical request served under `settings` (None; a new config forgets all)."""
        return self._tickets.get(settings, wire)

    def remember(self, settings: Settings, wire: WireKey, ticket: Ticket, body_bytes: int) -> None:
        """Keep `ticket` for requests identical to `wire` (a body of `body_bytes`)."""
        if body_bytes <= MAX_BODY_BYTES:
            size = _OVERHEAD + sum(len(part) for part in wire[1:6] if part is not None)
            self._tickets.put(settings, wire, ticket, size)
