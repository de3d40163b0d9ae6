"""Repeated hits answered from their bytes, before aiohttp parses them.

The repeat path (gateway.http.repeat_hits) still builds a request, runs the middleware and a handler and
writes through a response object; for a hit those are most of its cost. So when it has served a request
whose bytes came in one read on a connection waiting for its next request, and those bytes are exactly
that request (its request line, its headers as parsed, "Name: value" each in order, and its body: nothing
before it or after), they are learned, and that connection is known to stand between two requests. The
connection (gateway.serving.connections) then hands its next read here first: when the read is byte for
byte a learned request, whose ticket still holds under the current config and whose entry is still held
in memory, it is answered here as the repeat path answers it (the same status, headers and body, a
ledger row of what it saved, an access log line, the same metrics). Anything else goes aiohttp's way.

What the bytes are compared with holds the client's token, so learned bytes only ever answer the caller
who sent them. The Date header comes from aiohttp's own `helpers.rfc822_formatted_time` (not public API;
pyproject.toml pins aiohttp), as on aiohttp's answers. Bounded: MAX_REQUESTS learned requests of
MAX_READ_BYTES at most, MAX_BYTES of them together, the oldest going first; a new config forgets them all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from aiohttp import web
from aiohttp.helpers import rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE

from gateway.cache.service import Lookup, ResponseCache
from gateway.config.holder import ConfigHolder
from gateway.config.model import Settings
from gateway.http.cached import file_hit, hit_body, hit_headers
from gateway.http.repeat_hits import MAX_REQUESTS, ConfigTable, RepeatHits, Ticket, WireKey, note_repeat
from gateway.http.whole_reads import ReadKeeper
from gateway.observability.access_log import AccessLog, AccessRecord, new_request_id

if TYPE_CHECKING:
    from gateway.budget.engine import BudgetEngine
    from gateway.observability.instruments import GatewayMetrics

__all__ = ["WireHits", "MAX_BYTES", "MAX_READ_BYTES"]

MAX_BYTES = 8 * 1024 * 1024       # learned requests' bytes together
MAX_READ_BYTES = 16 * 1024        # a larger read (head and body) is not learned
_OVERHEAD = 512                   # bytes counted per learned request beside its read
log = logging.getLogger("gateway")


class _Learned(NamedTuple):
    wire: WireKey
    method: str
    path: str


class WireHits:
    """Learned request bytes, and answers to them."""

    def __init__(self, config: ConfigHolder, repeats: RepeatHits, cache: ResponseCache, budget: BudgetEngine,
                 access_log: AccessLog, metrics: GatewayMetrics, max_requests: int = MAX_REQUESTS,
                 max_bytes: int = MAX_BYTES) -> None:
        self._config, self._repeats, self._cache, self._budget = config, repeats, cache, budget
        self._access_log, self._metrics = access_log, metrics
        self._learned: ConfigTable[bytes, _Learned] = ConfigTable(max_requests, max_bytes)
        self.answered = 0               # requests answered from their bytes since start

    def __len__(self) -> int:
        return len(self._learned)

    def learn(self, request: web.Request, settings: Settings, wire: WireKey, body: bytes) -> None:
        """After the repeat path served `request` (under `wire`): learn its bytes if its read was exactly it."""
        connection = request.protocol
        if not isinstance(connection, ReadKeeper):
            return
        read = connection.take_read()
        if read is None or not request.keep_alive or "Expect" in request.headers or \
                read != _wire_form(request, body):
            return
        connection.stands_at_boundary()
        if settings is self._config.current:        # (reloaded meanwhile: learned under the new one only)
            self._learned.put(settings, read, _Learned(wire, request.method, request.path), len(read) + _OVERHEAD)

    def answer(self, read: bytes, send: Callable[[bytes], None]) -> bool:
        """Send the whole HTTP answer to `read` when it is a learned request the cache still answers, then
        account for it; False (nothing sent) otherwise."""
        settings = self._config.current
        learned = self._learned.get(settings, read) if len(read) <= MAX_READ_BYTES else None
        if learned is None:
            return False
        ticket = self._repeats.find(settings, learned.wire)
        hit = None if ticket is None else self._cache.held_hit(ticket.key, ticket.stream, ticket.wants_usage)
        if ticket is None or hit is None:
            return False
        record = AccessRecord(new_request_id(), learned.method, learned.path)
        send(self._answer(hit, record.request_id))
        self.answered += 1
        try:
            self._account(settings, learned, ticket, hit, record)
        except Exception:                    # sent already: as a failure after the answer on aiohttp's way
            log.exception("accounting for a cache hit answered from its bytes failed (%s)", record.request_id)
        return True

    def _answer(self, hit: Lookup, request_id: str) -> bytes:
        """The repeat path's answer, head and body (its Date as aiohttp formats it)."""
        body = hit_body(hit)
        headers = hit_headers(hit, self._cache.clock.now(), request_id)
        headers |= {"Content-Length": str(len(body)), "Date": rfc822_formatted_time(), "Server": SERVER_SOFTWARE}
        head = "HTTP/1.1 200 OK\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        return (head + "\r\n").encode() + body

    def _account(self, settings: Settings, learned: _Learned, ticket: Ticket, hit: Lookup,
                 record: AccessRecord) -> None:
        """What the repeat path and the middleware record of a hit: its ledger row, log line and metrics."""
        record.endpoint = learned.wire[0]
        note_repeat(record, ticket)
        file_hit(self._budget, settings, ticket.caller, record, hit, None)
        record.status = 200
        self._access_log.write(record)
        self._metrics.request_served(record)


def _wire_form(request: web.Request, body: bytes) -> bytes:
    """`request` as a client that writes "Name: value" headers sends it (HTTP/1.1)."""
    parts = [b"%s %s HTTP/1.1\r\n" % (request.method.encode(), request.raw_path.encode())]
    for name, value in request.raw_headers:
        parts += (name, b": ", value, b"\r\n")
    parts += (b"\r\n", body)
    return b"".join(parts)
