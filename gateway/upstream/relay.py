"""Passing an upstream answer to the client: JSON whole, SSE event by event as it arrives (see stream_meter)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway.domain.request import media_type_of
from gateway.errors import UpstreamFailure
from gateway.redact import Redactor
from gateway.upstream.bounded import BodyTooLarge, read_bounded
from gateway.upstream.dialect import CHAT, Dialect
from gateway.upstream.stream_meter import STREAM_TRUNCATED, StreamOutcome
from gateway.upstream.usage import UNREADABLE, ReadUsage

__all__ = ["PASSED_HEADERS", "relay_json", "relay_stream", "is_event_stream"]

# Upstream headers a client may see; everything else (cookies, server, provider internals) stays here.
PASSED_HEADERS = ("Content-Type", "Retry-After", "retry-after-ms", "x-ratelimit-limit-requests",
                  "x-ratelimit-limit-tokens", "x-ratelimit-remaining-requests",
                  "x-ratelimit-remaining-tokens", "x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
_PASSED = {name.lower(): name for name in PASSED_HEADERS}


def passed_headers(response: aiohttp.ClientResponse) -> dict[str, str]:
    """The upstream headers that are passed on to the client."""
    passed: dict[str, str] = {}   # one pass over the few headers an answer has, not a lookup per name
    for name, value in response.headers.items():
        known = _PASSED.get(name.lower())
        if known is not None and known not in passed:   # the first of repeated headers, as headers[name]
            passed[known] = value
    return passed


def is_event_stream(response: aiohttp.ClientResponse) -> bool:
    return media_type_of(response.headers.get("Content-Type")) == "text/event-stream"


async def relay_json(response: aiohttp.ClientResponse, redactor: Redactor, extra_headers: dict[str, str],
                     max_bytes: int, dialect: Dialect = CHAT) -> tuple[web.Response, ReadUsage]:
    """Read the whole upstream answer and build the client's response (plus `extra_headers`), with usage on success.

    An answer that cannot be read whole is an UpstreamFailure: 502 when it is over `max_bytes` or cut
    short, 504 when it stalled (its connection is closed either way).
    """
    try:
        body = redactor.bytes(await read_bounded(response, max_bytes))
    except BodyTooLarge:
        raise UpstreamFailure(f"The provider's answer is larger than the gateway's {max_bytes}-byte limit.",
                              code="upstream_response_too_large") from None
    except asyncio.TimeoutError:     # (before ClientError: aiohttp's read timeout is both)
        raise UpstreamFailure("The provider stopped sending its answer before it was complete.",
                              status=504, code="upstream_timeout") from None
    except (aiohttp.ClientError, ConnectionError):
        raise UpstreamFailure("The provider's answer ended before it was complete.",
                              code="upstream_truncated") from None
    usage = usage_of_answer(body, dialect.usage_from) if 200 <= response.status < 300 else None
    headers = passed_headers(response)
    headers.update(extra_headers)
    return web.Response(body=body, status=response.status, headers=headers), usage


def usage_of_answer(body: bytes, usage_from: Callable[[Any], ReadUsage] = CHAT.usage_from) -> ReadUsage:
    """The usage block of a whole JSON answer, parsed from the answer's tail when it can be.

    Providers put `usage` last, after the long choices. `"usage"` with both quotes never occurs inside
    a JSON string (its quotes would be escaped), and `{` + the tail from it is valid JSON only when it
    is a key of the top-level object; anything else falls back to parsing the whole answer.
    """
    at = body.rfind(b'"usage"')
    if at > 0:
        try:
            tail = orjson.loads(b"{" + body[at:])
        except orjson.JSONDecodeError:
            tail = None
        if isinstance(tail, dict):
            return usage_from(tail)
    try:
        return usage_from(orjson.loads(body))
    except orjson.JSONDecodeError:
        return UNREADABLE if at >= 0 else None   # a usage key in a body that is no JSON: unknown, not absent


class _SseSplitter:
    """Splits a byte stream into whole SSE events; a partial event waits for the next chunk."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events completed by `chunk`; any line ending (CRLF, CR, LF) is accepted."""
        data = self._pending + chunk
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events = data.split(b"\n\n")
        self._pending = events.pop()
        return [event + b"\n\n" for event in events if event]

    def flush(self) -> list[bytes]:
        """At the end of the stream: the last event, even without its blank line."""
        tail, self._pending = self._pending.strip(b"\n"), b""
        return [tail + b"\n\n"] if tail else []


async def relay_stream(upstream: aiohttp.ClientResponse, client: web.StreamResponse, wants_usage: bool,
                       redactor: Redactor, outcome: StreamOutcome, dialect: Dialect = CHAT) -> None:
    """Relay SSE events into `outcome` as they arrive, within its limits; a stream that ends early, or that
    the gateway ends (its reserved output spent, or its time up: see OpenStreams), gets an error event.

    `outcome` belongs to the caller, so what was relayed is known even if this is cancelled.
    """
    splitter = _SseSplitter()
    try:
        async for chunk in upstream.content.iter_any():
            await _forward(splitter.feed(chunk), client, outcome, wants_usage, redactor, dialect)
            if outcome.ended_by is not None:
                break
        else:
            await _forward(splitter.flush(), client, outcome, wants_usage, redactor, dialect)
    except _ClientGone:
        outcome.client_gone = True
        return
    except (aiohttp.ClientError, asyncio.TimeoutError):
        pass   # the upstream broke off, or OpenStreams closed it at its deadline: reported to the client below
    if outcome.ended_by is not None:
        upstream.close()                     # the gateway ended it: the upstream must stop generating
    if not outcome.complete:
        await _write_error(client, outcome, dialect)


async def _forward(events: list[bytes], client: web.StreamResponse, outcome: StreamOutcome,
                   wants_usage: bool, redactor: Redactor, dialect: Dialect) -> None:
    """Write the events the client should see, as one write, up to an event that ends the stream."""
    out = dialect.admit(events, outcome, wants_usage)
    if out:
        if outcome.first_write_at is None:
            outcome.first_write_at = time.perf_counter()
        data = redactor.bytes(b"".join(out))
        if outcome.capture is not None:
            outcome.capture.feed(data)
        try:
            await client.write(data)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError):
            raise _ClientGone from None


class _ClientGone(Exception):
    """Writing to the client failed: it disconnected."""


async def _write_error(client: web.StreamResponse, outcome: StreamOutcome, dialect: Dialect) -> None:
    """End the stream with the error event of `outcome.ended_by` (the upstream broke off, if unset)."""
    outcome.ended_by = outcome.ended_by or STREAM_TRUNCATED
    try:
        await client.write(dialect.error_events[outcome.ended_by])
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        outcome.client_gone = True
