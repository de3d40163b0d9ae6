"""`GET /metrics`: the Prometheus exposition, optionally behind a bearer metrics key."""

from __future__ import annotations

import hmac

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from gateway.appkeys import BACKGROUND, BUDGET, CONFIG, METRICS, RELOADER, RESILIENCE
from gateway.auth import bearer_token, token_digest
from gateway.config.model import Settings
from gateway.errors import Unauthorized
from gateway.metrics.scrape import Scrape, background_family, breaker_family, read_budgets, reload_family

__all__ = ["metrics_endpoint", "add_metrics_routes"]


def require_metrics_key(request: web.Request, settings: Settings) -> None:
    """Raise Unauthorized unless no metrics key is configured or the request bears it."""
    expected = settings.server.metrics_key_sha256
    if expected is None:
        return
    token = bearer_token(request)
    digest = None if token is None else token_digest(token)
    if digest is None or not hmac.compare_digest(expected, digest):
        raise Unauthorized("The metrics endpoint needs 'Authorization: Bearer <metrics key>'.")


async def metrics_endpoint(request: web.Request) -> web.Response:
    """Render the registry plus the families read for this scrape (one budget store read)."""
    app = request.app
    settings = app[CONFIG].current
    require_metrics_key(request, settings)
    metrics = app[METRICS]
    families = [*await read_budgets(app[BUDGET], settings, metrics),
                breaker_family(app[RESILIENCE], settings), reload_family(app.get(RELOADER)),
                background_family(app[BACKGROUND])]
    return await make_aiohttp_handler(Scrape(metrics.registry, families))(request)


def add_metrics_routes(app: web.Application) -> None:
    app.router.add_get("/metrics", metrics_endpoint)
