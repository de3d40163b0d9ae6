"""The proxy handler: one request, top to bottom, each step in its own module."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from gateway.budget.engine import BudgetEngine
from gateway.budget.reservation import Downgrade, Reservation
from gateway.cache.service import Lookup, ResponseCache
from gateway.config.holder import ConfigHolder
from gateway.config.model import CallerIdentity, Settings
from gateway.domain.api_requests import API_ENDPOINTS
from gateway.domain.ledger_facts import LedgerFacts
from gateway.domain.request import ENDPOINTS, Endpoint, ProxyRequest
from gateway.domain.worst_case import WorstCase
from gateway.errors import UpstreamFailure
from gateway.http.appkeys import (ACCESS_LOG, BUDGET, CACHE, CONFIG, METRICS, OPEN_STREAMS, PROVIDERS, RESILIENCE,
                                  ROUTER, WIRE_HITS)
from gateway.http.auth import KnownTokens, TokenReader, anthropic_token, authenticate, bearer_token
from gateway.http.cached import cache_header, cacheable, capture_for, keep_answer, look_up, serve_hit
from gateway.http.middleware import RECORD
from gateway.http.reading import read_proxy_request
from gateway.http.repeat_hits import (RepeatHits, Ticket, WireKey, may_repeat, note_asked, note_repeat, ticket_for,
                                      wire_key)
from gateway.http.wire_hits import WireHits
from gateway.observability.access_log import AccessRecord
from gateway.resilience.registry import ResilienceRegistry
from gateway.routing.canary_runs import latency_of
from gateway.routing.router import RouteChoice, Router
from gateway.upstream.api_streams import DIALECTS
from gateway.upstream.charging import Bill, Delivery, bill_for
from gateway.upstream.dispatch import dispatch
from gateway.upstream.open_streams import OpenStreams
from gateway.upstream.providers import ProviderPool
from gateway.upstream.relay import is_event_stream, relay_json, relay_stream
from gateway.upstream.stream_meter import StreamOutcome

__all__ = ["Proxy", "serve", "add_proxy_routes"]

log = logging.getLogger("gateway")
_UNKNOWN = {"missing": "no usage", "unreadable": "unreadable usage",
            "over_reserved": "usage over what the request reserved"}


@dataclass(frozen=True)
class Proxy:
    """What the forwarded endpoints share, taken from the app once instead of once per request."""

    app: web.Application
    config: ConfigHolder
    router: Router
    budget: BudgetEngine
    resilience: ResilienceRegistry
    tokens: KnownTokens
    streams: OpenStreams
    cache: ResponseCache
    repeats: RepeatHits
    wire_hits: WireHits

    @functools.cached_property
    def providers(self) -> ProviderPool:
        """The provider pool (made when the app starts, for its lifetime)."""
        return self.app[PROVIDERS]


async def serve(request: web.Request, *, endpoint: Endpoint, proxy: Proxy,
                read_token: TokenReader = bearer_token) -> web.StreamResponse:
    """caller -> request -> route -> cache -> reserve -> providers -> relay -> settle (-> cache); a request
    served from the cache before is answered again from this replica's memory at once (see repeat_hits)."""
    record = request[RECORD]
    record.endpoint = endpoint.kind
    settings = proxy.config.current
    wire = None
    if proxy.repeats and settings.cache.models and may_repeat(request):
        wire = wire_key(request, endpoint, read_token, body := await request.read())
        ticket = proxy.repeats.find(settings, wire)
        if ticket is not None:
            hit = proxy.cache.held_hit(ticket.key, ticket.stream, ticket.wants_usage)
            if hit is not None:
                return await serve_repeat(request, proxy, settings, ticket, hit, wire, body)
    caller = authenticate(request, settings, proxy.tokens, read_token)
    record.caller = caller.name
    req = await read_proxy_request(request, endpoint, settings.server)
    note_asked(record, req)
    choice = proxy.router.route(settings, caller, req, request.headers)
    record.route = choice.plan.route
    lookup = await look_up(proxy.cache, settings, caller, req, request) if cacheable(settings, req) else None
    if lookup is None:
        return await forward(request, proxy, settings, caller, req, choice, Delivery(True))
    record.cache = lookup.result
    if lookup.entry is not None:
        plan = choice.plan
        held = await proxy.budget.reserve_hit(record.request_id, settings, caller, plan, record.user)
        if held is None and proxy.router.fixed(settings, req.model) and \
                not proxy.budget.limits_hits(settings, caller, plan):
            body = await request.read()                                              # read already: no wait
            wire = wire or wire_key(request, endpoint, read_token, body)
            proxy.repeats.remember(settings, wire, ticket_for(caller, req, plan.route, lookup.key), len(body))
        return await serve_hit(request, lookup, proxy.budget, settings, caller, held, proxy.cache.clock.now())
    delivery = Delivery(True, capture=capture_for(lookup, settings.cache) if req.stream else None)
    try:
        return await forward(request, proxy, settings, caller, req, choice, delivery)
    finally:
        keep_answer(proxy.cache, lookup, settings.cache, delivery, record)


async def serve_repeat(request: web.Request, proxy: Proxy, settings: Settings, ticket: Ticket, hit: Lookup,
                       wire: WireKey, body: bytes) -> web.StreamResponse:
    """Answer a request identical to one the full path served from the cache, with what it made of that one;
    then learn its bytes, if they came whole, to answer them again before they are parsed (see wire_hits)."""
    record = request[RECORD]
    note_repeat(record, ticket)
    response = await serve_hit(request, hit, proxy.budget, settings, ticket.caller, None, proxy.cache.clock.now())
    if record.error is None:
        proxy.wire_hits.learn(request, settings, wire, body)
    return response


async def forward(request: web.Request, proxy: Proxy, settings: Settings, caller: CallerIdentity,
                  req: ProxyRequest, choice: RouteChoice, delivery: Delivery) -> web.StreamResponse:
    """reserve -> providers -> relay -> settle."""
    record, plan = request[RECORD], choice.plan
    reservation = await proxy.budget.reserve(record.request_id, settings, caller, plan, req)
    if isinstance(reservation, Downgrade):   # refused by a policy that serves a cheaper model instead
        cheaper = proxy.router.plan_for(settings, reservation.model, req.endpoint)
        reservation = await proxy.budget.reserve_downgraded(record.request_id, settings, caller, cheaper, req,
                                                            reservation)
    record.policies, record.downgraded_from = reservation.policies, reservation.downgraded_from
    if reservation.skip:
        record.rate_skipped = tuple(sorted(reservation.skip))
    record.model = reservation.plan.model
    providers = proxy.providers
    try:
        delivery.reply = await dispatch(req, reservation.plan, providers, proxy.resilience,
                                        deadline_s=settings.retry.deadline_s, skip=reservation.skip)
        record.provider, record.model = delivery.reply.target.provider, delivery.reply.target.upstream_model
        record.attempts = delivery.reply.attempts
        return await respond(request, req, delivery, providers, proxy.streams, reservation.worst,
                             reservation.headers)
    except UpstreamFailure as failure:
        delivery.upstream_failed = True
        if failure.attempts is not None:    # no provider answered
            record.attempts = failure.attempts
        raise
    finally:
        settle(proxy.budget, record, reservation, delivery)
        if choice.run is not None and reservation.plan is plan:
            tally(choice, record, delivery)


async def respond(request: web.Request, req: ProxyRequest, delivery: Delivery, providers: ProviderPool,
                  streams: OpenStreams, worst: WorstCase, limits: dict[str, str] | None = None) -> web.StreamResponse:
    """Pass the upstream answer on: streamed event by event (within the request's worst case), or whole;
    with the x-ratelimit-* headers of the request's tightest rate limit (`limits`)."""
    assert delivery.reply is not None
    reply, redactor, record = delivery.reply, providers.redactor, request[RECORD]
    target = reply.target
    served_by = {"x-gateway-provider": target.provider, "x-gateway-model": target.upstream_model,
                 "x-gateway-attempts": str(reply.attempts), "x-request-id": record.request_id}
    if record.downgraded_from is not None:
        served_by["x-gateway-downgraded-from"] = record.downgraded_from
    if record.cache is not None:
        served_by["x-gateway-cache"] = cache_header(record.cache)
    if limits is not None:
        served_by |= limits
    try:
        if not (req.stream and reply.response.status == 200 and is_event_stream(reply.response)):
            response, delivery.usage = await relay_json(reply.response, redactor, served_by,
                                                        reply.provider_config.max_response_bytes,
                                                        DIALECTS[req.endpoint.api])
            delivery.body = response.body if isinstance(response.body, bytes) else None
            await send_now(request, response)
            return response
        client = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", **served_by})
        await client.prepare(request)
        delivery.stream = StreamOutcome(worst, target.price)
        delivery.stream.capture = delivery.capture
        # ended at stream_s, or by a shutdown past its grace
        streams.add(reply.response, delivery.stream, reply.provider_config.timeouts.stream_s)
        try:
            await relay_to_client(request, req, delivery.stream, reply.response, client, providers)
        finally:
            streams.discard(reply.response)
        return client
    finally:
        reply.response.release()


async def send_now(request: web.Request, response: web.Response) -> None:
    """Send a whole answer at once, so that settling, logging and counting it come after the client has it."""
    try:
        await response.prepare(request)
        await response.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        request[RECORD].error = "client_disconnected"   # it was served: it is still charged


async def relay_to_client(request: web.Request, req: ProxyRequest, outcome: StreamOutcome,
                          upstream: aiohttp.ClientResponse, client: web.StreamResponse,
                          providers: ProviderPool) -> None:
    """Relay the stream; once its first byte is out, a failure can only end it, never replace it."""
    record = request[RECORD]
    try:
        await relay_stream(upstream, client, req.wants_usage, providers.redactor, outcome,
                           DIALECTS[req.endpoint.api])
        if not outcome.client_gone:
            await client.write_eof()
    except Exception:
        log.exception("relaying stream %s failed after it started", record.request_id)
        outcome.client_gone = True
    if outcome.first_write_at is not None:
        record.first_byte_s = outcome.first_write_at - record.started
    if not outcome.complete:
        record.error = "client_disconnected" if outcome.client_gone else outcome.ended_by


def settle(budget: BudgetEngine, record: AccessRecord, reservation: Reservation, delivery: Delivery) -> None:
    """Charge what was served (see gateway.upstream.charging), or release the reservation when nothing was.

    The store is written in the background: the answer does not wait for it.
    """
    bill = delivery.bill = bill_for(delivery, reservation.plan, reservation.worst)
    if bill is not None:
        record.usage, record.cost_nano, record.usage_unknown = bill.usage, bill.charge.usd_nano, bill.unknown
        if bill.unknown is not None:
            _warn_unknown(record, bill)
    facts = LedgerFacts(record.model, record.requested_model, record.provider, record.attempts, record.usage,
                        record.started, record.endpoint, record.user, record.session)
    budget.settle(reservation, bill.charge if bill else None, facts)


def tally(choice: RouteChoice, record: AccessRecord, delivery: Delivery) -> None:
    """Count the request in its canary arm: served by the arm's provider (with its cost and latency), or failed."""
    assert choice.run is not None
    served_by = None if delivery.upstream_failed or delivery.reply is None else delivery.reply.target.provider
    choice.run.observe(choice, served_by, record.cost_nano, latency_of(record.started, record.first_byte_s))


def _warn_unknown(record: AccessRecord, bill: Bill) -> None:
    """Say that an answer was charged on the gateway's bound, not on the upstream's usage (never its values)."""
    log.warning("provider %s answered request %s with %s; charged the gateway's bound instead (%d tokens)",
                bill.target.provider, record.request_id, _UNKNOWN.get(bill.unknown or "", "usage"),
                bill.usage.total_tokens)


def add_proxy_routes(app: web.Application) -> None:
    """Register the forwarded endpoints: OpenAI's chat, completions, embeddings and Responses, Anthropic's Messages."""
    repeats = RepeatHits()
    app[WIRE_HITS] = wire_hits = WireHits(app[CONFIG], repeats, app[CACHE], app[BUDGET], app[ACCESS_LOG], app[METRICS])
    proxy = Proxy(app, app[CONFIG], app[ROUTER], app[BUDGET], app[RESILIENCE], KnownTokens(), app[OPEN_STREAMS],
                  app[CACHE], repeats, wire_hits)
    for path, kind in (("/v1/chat/completions", "chat"), ("/v1/completions", "completions"),
                       ("/v1/embeddings", "embeddings")):
        app.router.add_post(path, functools.partial(serve, endpoint=ENDPOINTS[kind], proxy=proxy))
    app.router.add_post("/v1/responses", functools.partial(serve, endpoint=API_ENDPOINTS["responses"], proxy=proxy))
    app.router.add_post("/v1/messages", functools.partial(serve, endpoint=API_ENDPOINTS["messages"], proxy=proxy,
                                                          read_token=anthropic_token))
