"""The proxy handler: one request, top to bottom, each step in its own module."""

from __future__ import annotations

from aiohttp import web

from gateway.appkeys import BUDGET, CONFIG, PROVIDERS, RESILIENCE
from gateway.auth import authenticate
from gateway.budget.engine import Reservation
from gateway.middleware import RECORD
from gateway.pricing import Usage, charge_for
from gateway.proxy.dispatch import UpstreamReply, dispatch
from gateway.proxy.plan import plan_for
from gateway.proxy.relay import StreamOutcome, is_event_stream, relay_json, relay_stream
from gateway.proxy.request import ENDPOINTS, Endpoint, ProxyRequest, read_proxy_request
from gateway.tokens import prompt_upper_bound

__all__ = ["proxy_handler", "add_proxy_routes"]


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
    plan = plan_for(settings, req.model)
    record.route = plan.route
    reservation = await app[BUDGET].reserve(record.request_id, settings, caller, plan, req)
    record.policies, record.downgraded_from = reservation.policies, reservation.downgraded_from
    reply: UpstreamReply | None = None
    usage: Usage | None = None
    try:
        reply = await dispatch(req, reservation.plan, app[PROVIDERS], app[RESILIENCE],
                               deadline_s=settings.retry.deadline_s)
        record.provider, record.attempts = reply.target.provider, reply.attempts
        response, usage = await respond(request, req, reply)
    finally:
        await settle(request, reservation, reply, usage)
    return response


async def respond(request: web.Request, req: ProxyRequest,
                  reply: UpstreamReply) -> tuple[web.StreamResponse, Usage | None]:
    """Pass the upstream answer on: streamed event by event, or whole."""
    redactor = request.app[PROVIDERS].redactor
    upstream = reply.response
    served_by = {"x-gateway-provider": reply.target.provider, "x-gateway-attempts": str(reply.attempts)}
    try:
        if not (req.stream and upstream.status == 200 and is_event_stream(upstream)):
            response, usage = await relay_json(upstream, redactor)
            response.headers.update(served_by)
            return response, usage
        client = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "x-request-id": request[RECORD].request_id, **served_by})
        await client.prepare(request)
        outcome = await relay_stream(upstream, client, req.wants_usage, redactor)
        record = request[RECORD]
        if outcome.first_write_at is not None:
            record.first_byte_s = outcome.first_write_at - record.started
        if not outcome.complete:
            record.error = "client_disconnected" if outcome.client_gone else "stream_truncated"
        if not outcome.client_gone:
            await client.write_eof()
        return client, stream_usage(outcome, req)
    finally:
        upstream.release()


def stream_usage(outcome: StreamOutcome, req: ProxyRequest) -> Usage:
    """The usage of a relayed stream: the upstream's own, else the gateway's estimate."""
    if outcome.usage is not None:
        return outcome.usage
    return Usage(prompt_tokens=prompt_upper_bound(req.payload),
                 completion_tokens=outcome.content_events, estimated=True)


async def settle(request: web.Request, reservation: Reservation, reply: UpstreamReply | None,
                 usage: Usage | None) -> None:
    """Charge what the serving attempt really cost; release the reservation when nothing was served."""
    record = request[RECORD]
    charge = None
    if reply is not None and usage is not None:
        charge = charge_for(reply.target.price, usage)
        record.usage, record.cost_nano = usage, charge.usd_nano
    await request.app[BUDGET].settle(reservation, charge, record)


def add_proxy_routes(app: web.Application) -> None:
    """Register the forwarded OpenAI endpoints."""
    app.router.add_post("/v1/chat/completions", proxy_handler(ENDPOINTS["chat"]))
    app.router.add_post("/v1/completions", proxy_handler(ENDPOINTS["completions"]))
    app.router.add_post("/v1/embeddings", proxy_handler(ENDPOINTS["embeddings"]))
