"""The response cache in the request path: looked up before any budget is reserved, a hit served from it
(no upstream call, no budget or token window charged, one request in request-rate windows and in-flight
counters, a ledger row saying what it saved), an answer kept once delivered whole.

    kept     a 200 answer delivered whole, charged on the upstream's own usage, of the model the client
             asked for (not a downgrade), not a refusal, within cache.max_entry_bytes
    not      an error status, an upstream failure, a budget refusal, a stream cut short (or ended by the
             gateway, or left by its client), usage the gateway had to bound, a downgraded answer
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine
from typing import Any

import aiohttp
from aiohttp import web

from gateway.budget.engine import BudgetEngine
from gateway.budget.reservation import Reservation
from gateway.cache.assemble import StreamAssembler, storable_answer
from gateway.cache.service import ERROR, Lookup, ResponseCache
from gateway.config.model import CacheConfig, CallerIdentity, Settings
from gateway.domain.ledger_facts import LedgerFacts
from gateway.domain.pricing import Usage
from gateway.domain.request import ProxyRequest
from gateway.http.middleware import RECORD
from gateway.observability.access_log import AccessRecord
from gateway.upstream.charging import Delivery

__all__ = ["cacheable", "look_up", "serve_hit", "hit_headers", "hit_body", "file_hit", "capture_for", "keep_answer", "cache_header",
           "STREAM_CAPTURE_FACTOR"]

log = logging.getLogger("gateway.cache")
STREAM_CAPTURE_FACTOR = 8   # a stream relays up to this many times its whole answer's bytes before it is given up
_NOTHING = Usage()


def cacheable(settings: Settings, req: ProxyRequest) -> bool:
    """Whether the request is looked up: some model is cached, and it is no stream of another API than chat
    (the cache replays streams as chat events only: the other APIs' streams are neither read nor kept)."""
    return bool(settings.cache.models) and (req.endpoint.api == "openai-chat" or not req.stream)


def look_up(cache: ResponseCache, settings: Settings, caller: CallerIdentity, req: ProxyRequest,
            request: web.Request) -> Coroutine[Any, Any, Lookup | None]:
    """The cache's lookup of the request, to be awaited (a plain function: no coroutine of its own)."""
    return cache.lookup(settings.cache, caller, req.endpoint.kind, req.model, req.payload, req.stream,
                        req.wants_usage, request.headers.get("Cache-Control"))


def cache_header(result: str) -> str:
    """The `x-gateway-cache` value of a lookup that went upstream: `miss` (a failed lookup too) or `bypass`."""
    return "miss" if result == ERROR else result


async def serve_hit(request: web.Request, lookup: Lookup, budget: BudgetEngine, settings: Settings,
                    caller: CallerIdentity, held: Reservation | None, now: float) -> web.StreamResponse:
    """Answer from the cache (`held`: what `reserve_hit` held of it): the whole answer, or its SSE events, with
    its head and body in one write; then ledger what it saved."""
    record = request[RECORD]
    headers = hit_headers(lookup, now, record.request_id)
    if held is not None and held.headers is not None:
        headers |= held.headers
    # a web.Response holds its head back for its body; a StreamResponse would send them apart (two system calls)
    response = web.Response(body=hit_body(lookup), headers=headers)
    try:
        await response.prepare(request)
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        record.error = "client_disconnected"     # what was sent cost nothing either way
    finally:
        file_hit(budget, settings, caller, record, lookup, held)
    return response


def hit_headers(lookup: Lookup, now: float, request_id: str) -> dict[str, str]:
    """The headers of a hit's answer, besides its length, date and server."""
    assert lookup.entry is not None
    headers = {"Content-Type": "application/json"} if lookup.events is None else \
        {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    headers |= {"x-gateway-cache": "hit", "age": str(lookup.entry.age(now)), "x-request-id": request_id}
    return headers


def hit_body(lookup: Lookup) -> bytes:
    """A hit's answer: the whole answer, or its SSE events for a stream."""
    assert lookup.entry is not None
    return lookup.entry.body if lookup.events is None else lookup.events


def file_hit(budget: BudgetEngine, settings: Settings, caller: CallerIdentity, record: AccessRecord, lookup: Lookup,
             held: Reservation | None) -> None:
    """Ledger a hit at no cost with what it saved, and note both (and its policies) on its access record."""
    entry = lookup.entry
    assert entry is not None
    record.cost_nano, record.saved_nano = 0, entry.cost_nano
    facts = LedgerFacts(record.model, record.requested_model, None, 0, None, record.started, record.endpoint,
                        record.user, record.session)
    record.policies = budget.file_cache_hit(settings, caller, record.request_id, facts, entry.cost_nano, held)


def capture_for(lookup: Lookup, config: CacheConfig) -> StreamAssembler | None:
    """What keeps a stream's bytes as they are relayed, to join its answer, when the answer may be kept."""
    return StreamAssembler(config.max_entry_bytes * STREAM_CAPTURE_FACTOR) if lookup.write else None


def keep_answer(cache: ResponseCache, lookup: Lookup, config: CacheConfig, delivery: Delivery,
                record: AccessRecord) -> None:
    """Hand the cache the request's answer if it may be kept (else None: whoever waits on it goes on alone)."""
    bill = delivery.bill
    if bill is None or bill.unknown is not None or bill.usage.estimated:   # charged on the gateway's bound
        cache.finish(lookup, config, None, _NOTHING, 0)
        return
    try:
        answer = _answer(delivery, config) if lookup.write and record.downgraded_from is None else None
    except Exception:     # a fault putting the answer together must not leave its flight's followers waiting
        log.exception("response cache: the answer could not be put together; not kept")
        answer = None
    cache.finish(lookup, config, answer, bill.usage, bill.charge.usd_nano)


def _answer(delivery: Delivery, config: CacheConfig) -> bytes | None:
    """The whole answer a 200 delivered, if it may be kept."""
    reply = delivery.reply
    if reply is None or reply.response.status != 200 or delivery.bill is None:
        return None
    outcome = delivery.stream
    if outcome is not None:
        capture = outcome.capture
        if not outcome.complete or outcome.ended_by is not None or not isinstance(capture, StreamAssembler):
            return None
        return capture.answer(delivery.bill.usage)
    body = delivery.body   # read as JSON already: its usage was, and a bill on unread usage is never kept
    if body is None or len(body) > config.max_entry_bytes or not storable_answer(body):
        return None
    return body
