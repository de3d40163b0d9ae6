"""`GET /metrics`: the Prometheus exposition, optionally behind a bearer metrics key.

Under `gateway run --workers N` the worker that answers merges every worker's families (gateway.peers,
gateway.observability.merge); budget gauges, read from the shared store, are read once.
"""

from __future__ import annotations

import asyncio
import hmac

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.metrics_core import Metric

from gateway.config.model import Settings
from gateway.errors import Unauthorized
from gateway.http.appkeys import BACKGROUND, BUDGET, CONFIG, METRICS, PEERS, RELOADER, RESILIENCE, ROUTER
from gateway.http.auth import bearer_token, token_digest
from gateway.observability.canaries import read_canaries
from gateway.observability.merge import decode, encode, merge
from gateway.observability.scrape import Scrape, background_family, breaker_family, read_budgets, reload_family

__all__ = ["metrics_endpoint", "add_metrics_routes", "own_families"]


def require_metrics_key(request: web.Request, settings: Settings) -> None:
    """Raise Unauthorized unless no metrics key is configured or the request bears it."""
    expected = settings.server.metrics_key_sha256
    if expected is None:
        return
    token = bearer_token(request)
    digest = None if token is None else token_digest(token)
    if digest is None or not hmac.compare_digest(expected, digest):
        raise Unauthorized("The metrics endpoint needs 'Authorization: Bearer <metrics key>'.")


def own_families(app: web.Application) -> list[Metric]:
    """This process's families: its registry, breaker states, config reloads and background failures."""
    settings = app[CONFIG].current
    return [*app[METRICS].registry.collect(), breaker_family(app[RESILIENCE], settings),
            reload_family(app.get(RELOADER)), background_family(app[BACKGROUND])]


async def metrics_endpoint(request: web.Request) -> web.StreamResponse:
    """Render every worker's families plus the budget and canary gauges read for this scrape from the store."""
    app = request.app
    settings = app[CONFIG].current
    require_metrics_key(request, settings)
    peers = app.get(PEERS)
    asked = asyncio.ensure_future(peers.siblings("metrics")) if peers is not None else None
    try:
        budgets = await read_budgets(app[BUDGET], settings, app[METRICS])
        budgets += await read_canaries(app[ROUTER].canaries, settings)
        families = own_families(app)         # after the read, so this scrape shows its own store read
        if asked is not None:
            families = merge([families, *map(decode, await asked)])
    finally:
        if asked is not None and not asked.done():
            asked.cancel()
    return await make_aiohttp_handler(Scrape(families, budgets))(request)


def add_metrics_routes(app: web.Application) -> None:
    """Register /metrics; under --workers, also tell sibling workers this one's families."""
    app.router.add_get("/metrics", metrics_endpoint)
    peers = app.get(PEERS)
    if peers is not None:
        peers.provide("metrics", lambda: encode(own_families(app)))
