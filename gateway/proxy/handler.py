"""The proxy handler: one request, top to bottom, each step in its own module."""

from __future__ import annotations

import logging

from aiohttp import web

from gateway.appkeys import BUDGET, CONFIG, PLANS, PROVIDERS, RESILIENCE
from gateway.auth import authenticate
from gateway.budget.engine import Reservation
from gateway.errors import UpstreamFailure
from gateway.middleware import RECORD
from gateway.pricing import charge_for
from gateway.proxy.charging import Delivery, billable_usage
from gateway.proxy.dispatch import dispatch
from gateway.proxy.plan import PlanCache
from gateway.proxy.relay import StreamOutcome, is_event_stream, relay_json, relay_stream
from gateway.proxy.request import ENDPOINTS, Endpoint, ProxyRequest, read_proxy_request

__all__ = ["proxy_handler", "add_proxy_routes"]

log = logging.getLogger("gateway")


def proxy_handler(endpoint: Endpoint):
    """The aiohttp handler forwarding `endpoint`."""
    async def handle(request: web.Request) -> web.StreamResponse:
        return await serve(request, endpoint)
    return handle


async def serve(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    """caller -> request -> plan -> reserve -> providers -> relay -> settle."""
    app, record = request.app, request[RECORD]
    settings = app[CONFIG].current
    caller = authenticate(request, settings)
    record.caller = caller.name
    req = await read_proxy_request(request, endpoint, settings.server)
    record.model, record.stream = req.model, req.stream
    plan = app[PLANS].plan_for(settings, req.model)
    record.route = plan.route
    reservation = await app[BUDGET].reserve(record.request_id, settings, caller, plan, req)
    record.policies, record.downgraded_from = reservation.policies, reservation.downgraded_from
    delivery = Delivery(dispatched=True)
    try:
        delivery.reply = await dispatch(req, reservation.plan, app[PROVIDERS], app[RESILIENCE],
                                        deadline_s=settings.retry.deadline_s)
        record.provider, record.attempts = delivery.reply.target.provider, delivery.reply.attempts
        return await respond(request, req, delivery)
    except UpstreamFailure:
        delivery.upstream_failed = True
        raise
    finally:
        settle(request, reservation, req, delivery)


async def respond(request: web.Request, req: ProxyRequest, delivery: Delivery) -> web.StreamResponse:
    """Pass the upstream answer on: streamed event by event, or whole."""
    assert delivery.reply is not None
    reply, redactor = delivery.reply, request.app[PROVIDERS].redactor
    served_by = {"x-gateway-provider": reply.target.provider, "x-gateway-attempts": str(reply.attempts)}
    try:
        if not (req.stream and reply.response.status == 200 and is_event_stream(reply.response)):
            response, delivery.usage = await relay_json(reply.response, redactor)
            response.headers.update(served_by)
            return response
        client = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "x-request-id": request[RECORD].request_id, **served_by})
        await client.prepare(request)
        delivery.stream = StreamOutcome()
        await relay_to_client(request, req, delivery.stream, reply.response, client)
        return client
    finally:
        reply.response.release()


async def relay_to_client(request: web.Request, req: ProxyRequest, outcome: StreamOutcome, upstream,
                          client: web.StreamResponse) -> None:
    """Relay the stream; once its first byte is out, a failure can only end it, never replace it."""
    record = request[RECORD]
    try:
        await relay_stream(upstream, client, req.wants_usage, request.app[PROVIDERS].redactor, outcome)
        if not outcome.client_gone:
            await client.write_eof()
    except Exception:
        log.exception("relaying stream %s failed after it started", record.request_id)
        outcome.client_gone = True
    if outcome.first_write_at is not None:
        record.first_byte_s = outcome.first_write_at - record.started
    if not outcome.complete:
        record.error = "client_disconnected" if outcome.client_gone else "stream_truncated"


def settle(request: web.Request, reservation: Reservation, req: ProxyRequest, delivery: Delivery) -> None:
    """Charge what was served (see gateway.proxy.charging), or release the reservation when nothing was.

    The store is written in the background: the answer does not wait for it.
    """
    record = request[RECORD]
    charge = None
    billable = billable_usage(delivery, req, reservation.plan)
    if billable is not None:
        target, usage = billable
        charge = charge_for(target.price, usage)
        record.usage, record.cost_nano = usage, charge.usd_nano
    request.app[BUDGET].settle(reservation, charge, record)


def add_proxy_routes(app: web.Application) -> None:
    """Register the forwarded OpenAI endpoints."""
    app[PLANS] = PlanCache()
    app.router.add_post("/v1/chat/completions", proxy_handler(ENDPOINTS["chat"]))
    app.router.add_post("/v1/completions", proxy_handler(ENDPOINTS["completions"]))
    app.router.add_post("/v1/embeddings", proxy_handler(ENDPOINTS["embeddings"]))
