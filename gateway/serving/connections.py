"""Client connections: aiohttp's protocol with a header deadline, and the table that caps and sweeps them.

aiohttp has no deadline for the request line and headers. `GatewayRequestHandler` starts a clock when a
connection is accepted, and again at the first byte of each later request on a kept-alive connection;
the clock stops when aiohttp has parsed the whole head. `ClientConnections.close_overdue` closes the
connections whose clock ran past `server.header_timeout_s` (one sweep a fraction of a second, instead of
a timer per request). An idle kept-alive connection is closed by aiohttp after `keepalive_timeout_s`.

At the cap, a new connection makes room by closing the connection that has waited longest for its
request headers (EVICT_MIN_AGE_S at least, EVICT_SILENT_AGE_S when it sent nothing yet; up to EVICT_BATCH
of them at once, as nginx drains); while
only younger heads are coming it waits for them to age; with no head coming at all, it closes an idle
kept-alive connection; when every connection is busy with a request it waits.

A read on a connection known to stand between two requests goes first to `WireHits` (gateway.http.
wire_hits): when it is exactly a learned request, it is answered there and aiohttp never sees it. That
happens only while the connection waits for its next request with nothing queued, is not closing, and has
nothing left unsent (a client that does not read its answers is answered aiohttp's way, which waits for
it); the answer moves aiohttp's keep-alive deadline as aiohttp's own answers do.

The handler uses attributes of aiohttp's `RequestHandler` that are not public API: it reads `_waiter` (set
while it waits for the next request), `_messages` (parsed requests not yet handled), `_close`,
`_force_close`, `_upgraded` and `_keepalive_timeout`, and sets `_next_keepalive_close_time`; pyproject.toml pins aiohttp
to the releases this was checked against.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import math
import time
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.errors import InvalidRequest
from gateway.http.middleware import error_response
from gateway.http.whole_reads import ReadKeeper
from gateway.http.wire_hits import MAX_READ_BYTES, WireHits
from gateway.log_scrub import without_raw_bytes

__all__ = ["ClientConnections", "GatewayRequestHandler"]

log = logging.getLogger("gateway")
REPORT_EVERY_S = 60.0     # closings for the deadline or the cap are logged at most this often
EVICT_MIN_AGE_S = 0.25    # a head younger than this may just not have been read yet: not closed for room
EVICT_SILENT_AGE_S = 1.0  # nor a connection that sent nothing yet, for this long (its client may be slow to write)
EVICT_BATCH = 16          # heads closed at once at the cap (under a flood, one at a time is too slow)


class ClientConnections:
    """The open client connections: at most `cap`, none waiting for its headers past `header_timeout_s`."""

    def __init__(self, cap: int, header_timeout_s: float) -> None:
        self.cap = cap
        self.header_timeout_s = header_timeout_s
        self._open: set[GatewayRequestHandler] = set()
        self._changed = asyncio.Event()
        self._closed = {"header_timeout": 0, "at_capacity": 0}
        self._reported_at = -math.inf

    def __len__(self) -> int:
        return len(self._open)

    def opened(self, connection: GatewayRequestHandler) -> None:
        """Count a connection just accepted."""
        self._open.add(connection)

    def lost(self, connection: GatewayRequestHandler) -> None:
        """Forget a closed connection."""
        self._open.discard(connection)
        self._changed.set()

    async def room(self) -> None:
        """Return once one more connection fits: at the cap, close one that waits for a request, else wait."""
        loop = asyncio.get_running_loop()
        while len(self._open) >= self.cap:
            self._changed.clear()
            for victim in self._waited_longest(loop.time()):
                victim.force_close()
                self._count("at_capacity")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), EVICT_MIN_AGE_S)

    def _waited_longest(self, now: float) -> list[GatewayRequestHandler]:
        """Up to EVICT_BATCH connections waiting longest (EVICT_MIN_AGE_S at least) for their headers; none
        while younger heads are coming (they age into the next ones: a kept-alive client between two requests
        is not dropped for a flood of new connections); else one idle kept-alive connection."""
        heads = [c for c in self._open if c.header_started is not None]
        old = [c for c in heads if now - (c.header_started or now) >= (EVICT_SILENT_AGE_S if c.silent else EVICT_MIN_AGE_S)]
        if old:
            return heapq.nsmallest(EVICT_BATCH, old, key=lambda c: c.header_started or 0.0)
        if heads:
            return []
        return [c for c in self._open if c.between_requests][:1]

    def close_overdue(self, now: float) -> int:
        """Close every connection whose headers are not complete `header_timeout_s` after its clock started."""
        overdue = [c for c in self._open if c.header_started is not None and now - c.header_started > self.header_timeout_s]
        for connection in overdue:
            connection.force_close()
            self._count("header_timeout")
        return len(overdue)

    def close_waiting(self) -> None:
        """Close every connection that is not serving a request (for shutdown)."""
        for connection in [c for c in self._open if c.between_requests]:
            connection.force_close()

    async def drained(self, timeout_s: float, hurry: asyncio.Event | None = None) -> bool:
        """Wait until every connection has closed, at most `timeout_s` or until `hurry` is set; True if all did."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._open and (hurry is None or not hurry.is_set()) and (left := deadline - loop.time()) > 0:
            self._changed.clear()
            waits = [asyncio.ensure_future(self._changed.wait())]
            if hurry is not None:
                waits.append(asyncio.ensure_future(hurry.wait()))
            _, pending = await asyncio.wait(waits, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            for wait in pending:
                wait.cancel()
        return not self._open

    def _count(self, reason: str) -> None:
        """Count a connection closed by the server; say so in the log at most every REPORT_EVERY_S."""
        self._closed[reason] += 1
        now = time.monotonic()
        if now - self._reported_at >= REPORT_EVERY_S:
            self._reported_at = now
            log.warning("closed client connections: %d that sent no complete request head within %.3g s, "
                        "%d to make room at the cap of %d (totals since start)",
                        self._closed["header_timeout"], self.header_timeout_s, self._closed["at_capacity"],
                        self.cap)


_data_received = RequestHandler.data_received


def _reason(error: HttpProcessingError) -> str:
    """What the parser found wrong, without the raw bytes it quotes after it."""
    first = str(error.message or "").partition("\n")[0]
    return without_raw_bytes(first).partition(" b'[")[0].strip(" :") or "bad request"


class GatewayRequestHandler(RequestHandler, ReadKeeper):
    """aiohttp's HTTP protocol, with a header deadline, a place in `ClientConnections`, and malformed
    requests answered in OpenAI's error shape without echoing (or logging) their raw bytes."""

    __slots__ = ("_table", "_wire_hits", "header_started", "silent", "whole_read", "at_boundary")

    def __init__(self, manager: web.Server, table: ClientConnections, wire_hits: WireHits | None = None,
                 **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._table = table
        self._wire_hits = wire_hits
        self.header_started: float | None = None    # loop.time() when the current request head began
        self.silent = True                          # nothing received yet
        self.whole_read: bytes | None = None        # the last read, when one request's head was parsed from it
        self.at_boundary = False                    # the parser stands between requests (see wire_hits)

    @property
    def between_requests(self) -> bool:
        """True while no request is being served: the headers are still coming, or the connection is idle."""
        waiter = self._waiter
        return self.header_started is not None or (waiter is not None and not waiter.done())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.header_started = self._loop.time()     # the first request's head is due from the accept on
        super().connection_made(transport)
        self._table.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._table.lost(self)

    def data_received(self, data: bytes) -> None:
        if self.at_boundary and data:
            self.at_boundary = False
            if self._answered(data):
                self.at_boundary = True
                return
        self.silent = False
        if self.header_started is None and self._waiter is not None:
            self.header_started = self._loop.time()     # the first byte of a request on a kept-alive connection
        queued = len(self._messages)
        _data_received(self, data)                  # (not super(): this runs for every read)
        if self._messages:                          # a whole head was parsed: the request is due to be served
            self.header_started = None
        if data:                                    # kept until the next read (MAX_READ_BYTES at most)
            whole = len(self._messages) == queued + 1 and len(data) <= MAX_READ_BYTES
            self.whole_read = data if whole and self._wire_hits is not None else None
        elif len(self._messages) != queued:        # aiohttp's own call with b"": requests buffered before
            self.whole_read = None

    def take_read(self) -> bytes | None:
        read, self.whole_read = self.whole_read, None
        return read

    def stands_at_boundary(self) -> None:
        self.at_boundary = True

    def _answered(self, data: bytes) -> bool:
        """Answer `data` from its bytes (wire_hits) when it is a learned request and this connection waits for
        its next request with nothing left to send; keep the connection alive as aiohttp would."""
        waiter, transport = self._waiter, self.transport
        if self._wire_hits is None or waiter is None or waiter.done() or self._messages or self._close or \
                self._force_close or self._upgraded or transport is None or transport.is_closing() or \
                transport.get_write_buffer_size() or not self._wire_hits.answer(data, transport.write):
            return False
        self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
        return True

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """A request aiohttp could not parse: a short log line and an OpenAI-shaped error, no raw bytes."""
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        reason = _reason(exc)
        log.info("refused a malformed request from %s: %s", request.remote, reason)
        response = error_response(InvalidRequest(f"Malformed HTTP request: {reason}.", status=status))
        response.force_close()
        return response
