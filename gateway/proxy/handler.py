"""The proxy handler: one request, top to bottom, each step in its own module."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from gateway.access_log import AccessRecord
from gateway.appkeys import BUDGET, CONFIG, OPEN_STREAMS, PROVIDERS, RESILIENCE
from gateway.auth import KnownTokens, authenticate
from gateway.budget.engine import BudgetEngine, Reservation
from gateway.config.holder import ConfigHolder
from gateway.errors import UpstreamFailure
from gateway.middleware import RECORD
from gateway.pricing import charge_for
from gateway.proxy.charging import Delivery, billable_usage
from gateway.proxy.dispatch import dispatch
from gateway.proxy.plan import PlanCache
from gateway.proxy.providers import ProviderPool
from gateway.proxy.relay import StreamOutcome, is_event_stream, relay_json, relay_stream
from gateway.proxy.request import ENDPOINTS, Endpoint, ProxyRequest, read_proxy_request
from gateway.resilience.registry import ResilienceRegistry

__all__ = ["Proxy", "serve", "add_proxy_routes"]

log = logging.getLogger("gateway")


@dataclass(frozen=True)
class Proxy:
    """What the forwarded endpoints share, taken from the app once instead of once per request."""

    app: web.Application
    config: ConfigHolder
    plans: PlanCache
    budget: BudgetEngine
    resilience: ResilienceRegistry
    tokens: KnownTokens

    @property
    def providers(self) -> ProviderPool:
        """The provider pool (made when the app starts)."""
        return self.app[PROVIDERS]


async def serve(request: web.Request, *, endpoint: Endpoint, proxy: Proxy) -> web.StreamResponse:
    """caller -> request -> plan -> reserve -> providers -> relay -> settle."""
    record = request[RECORD]
    settings = proxy.config.current
    caller = authenticate(request, settings, proxy.tokens)
    record.caller = caller.name
    req = await read_proxy_request(request, endpoint, settings.server)
    record.model, record.stream = req.model, req.stream
    plan = proxy.plans.plan_for(settings, req.model)
    record.route = plan.route
    reservation = await proxy.budget.reserve(record.request_id, settings, caller, plan, req)
    record.policies, record.downgraded_from = reservation.policies, reservation.downgraded_from
    delivery = Delivery(dispatched=True)
    providers = proxy.providers
    try:
        delivery.reply = await dispatch(req, reservation.plan, providers, proxy.resilience,
                                        deadline_s=settings.retry.deadline_s)
        record.provider, record.attempts = delivery.reply.target.provider, delivery.reply.attempts
        return await respond(request, req, delivery, providers)
    except UpstreamFailure:
        delivery.upstream_failed = True
        raise
    finally:
        settle(proxy.budget, record, reservation, req, delivery)


async def respond(request: web.Request, req: ProxyRequest, delivery: Delivery,
                  providers: ProviderPool) -> web.StreamResponse:
    """Pass the upstream answer on: streamed event by event, or whole."""
    assert delivery.reply is not None
    reply, redactor = delivery.reply, providers.redactor
    served_by = {"x-gateway-provider": reply.target.provider, "x-gateway-attempts": str(reply.attempts),
                 "x-request-id": request[RECORD].request_id}
    try:
        if not (req.stream and reply.response.status == 200 and is_event_stream(reply.response)):
            max_bytes = providers[reply.target.provider].config.max_response_bytes
            response, delivery.usage = await relay_json(reply.response, redactor, served_by, max_bytes)
            await send_now(request, response)
            return response
        client = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache", **served_by})
        await client.prepare(request)
        delivery.stream = StreamOutcome()
        streams = request.app[OPEN_STREAMS]
        streams.add(reply.response)          # a shutdown past its grace cuts it (gateway.serving.server)
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
        await relay_stream(upstream, client, req.wants_usage, providers.redactor, outcome)
        if not outcome.client_gone:
            await client.write_eof()
    except Exception:
        log.exception("relaying stream %s failed after it started", record.request_id)
        outcome.client_gone = True
    if outcome.first_write_at is not None:
        record.first_byte_s = outcome.first_write_at - record.started
    if not outcome.complete:
        record.error = "client_disconnected" if outcome.client_gone else "stream_truncated"


def settle(budget: BudgetEngine, record: AccessRecord, reservation: Reservation, req: ProxyRequest,
           delivery: Delivery) -> None:
    """Charge what was served (see gateway.proxy.charging), or release the reservation when nothing was.

    The store is written in the background: the answer does not wait for it.
    """
    charge = None
    billable = billable_usage(delivery, req, reservation.plan)
    if billable is not None:
        target, usage = billable
        charge = charge_for(target.price, usage)
        record.usage, record.cost_nano = usage, charge.usd_nano
    budget.settle(reservation, charge, record)


def add_proxy_routes(app: web.Application) -> None:
    """Register the forwarded OpenAI endpoints."""
    proxy = Proxy(app, app[CONFIG], PlanCache(), app[BUDGET], app[RESILIENCE], KnownTokens())
    for path, kind in (("/v1/chat/completions", "chat"), ("/v1/completions", "completions"),
                       ("/v1/embeddings", "embeddings")):
        app.router.add_post(path, functools.partial(serve, endpoint=ENDPOINTS[kind], proxy=proxy))
