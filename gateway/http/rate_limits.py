"""GET /v1/rate_limits/status: each rate window's and in-flight counter's use, scoped to the caller."""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway.budget.rate_status import rate_report
from gateway.budget.status import visible_policies
from gateway.errors import StoreError, StoreUnavailable
from gateway.http.appkeys import BUDGET, CONFIG
from gateway.http.auth import authenticate

__all__ = ["add_rate_limit_routes"]


async def rate_status(request: web.Request) -> web.Response:
    """GET /v1/rate_limits/status[?policy=NAME]."""
    settings = request.app[CONFIG].current
    caller = authenticate(request, settings)
    policies = visible_policies(settings, caller, request.query.get("policy"))
    engine = request.app[BUDGET]
    try:
        data = await rate_report(engine, settings, policies, caller, engine.clock.now())
    except StoreError:
        raise StoreUnavailable("The budget store is unreachable; status cannot be read right now.") from None
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")


def add_rate_limit_routes(app: web.Application) -> None:
    """Register GET /v1/rate_limits/status."""
    app.router.add_get("/v1/rate_limits/status", rate_status)
