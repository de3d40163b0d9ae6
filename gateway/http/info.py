"""Endpoints that describe the gateway: models, liveness, readiness."""

from __future__ import annotations

import orjson
from aiohttp import web

from gateway.config.model import Settings
from gateway.http.appkeys import BUDGET, CONFIG
from gateway.http.auth import authenticate

__all__ = ["add_info_routes", "listed_models"]


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def listed_models(settings: Settings) -> list[str]:
    """Every model a client can ask for: exact routes, and priced models that a glob route serves."""
    names = {r.pattern for r in settings.routes if not any(c in r.pattern for c in "*?[")}
    names |= {m for m in settings.pricing if settings.route_for(m) is not None}
    return sorted(names)


async def models(request: web.Request) -> web.Response:
    settings = request.app[CONFIG].current
    authenticate(request, settings)
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "gateway"} for m in listed_models(settings)]
    return json_response({"object": "list", "data": data})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    store_ok = await request.app[BUDGET].ping()
    return json_response({"status": "ready" if store_ok else "store_unreachable", "config": "loaded",
                          "store": "ok" if store_ok else "unreachable"}, status=200 if store_ok else 503)


def add_info_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
