"""`GET /v1/providers/status`: each provider's circuit breaker, for admins only.

Anyone else gets the same 404 as an unknown path, so the endpoint does not reveal that it exists.
Only breaker state is shown: never a key, never a base URL.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import orjson
from aiohttp import web

from gateway.appkeys import CONFIG, RESILIENCE
from gateway.auth import authenticate
from gateway.errors import Unauthorized

__all__ = ["provider_status", "add_provider_status_routes"]

_FIELDS = ("provider", "state", "failure_rate", "calls_in_window", "open_until", "consecutive_opens")


def _iso(epoch: float | None) -> str | None:
    """Epoch seconds as ISO 8601 with a UTC offset, or None."""
    return None if epoch is None else datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat()


def _entry(snapshot: dict[str, Any]) -> dict[str, Any]:
    """One provider's public status: the listed fields only, `open_until` as ISO 8601."""
    entry = {name: snapshot[name] for name in _FIELDS}
    entry["open_until"] = _iso(snapshot["open_until"])
    return entry


def _require_admin(request: web.Request) -> None:
    """Raise the router's own 404 unless the caller holds the admin key."""
    try:
        caller = authenticate(request, request.app[CONFIG].current)
    except Unauthorized:
        raise web.HTTPNotFound() from None
    if not caller.admin:
        raise web.HTTPNotFound()


async def provider_status(request: web.Request) -> web.Response:
    """The breaker state of every configured provider, in OpenAI's list shape."""
    _require_admin(request)
    data = [_entry(snapshot) for snapshot in request.app[RESILIENCE].snapshot()]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")


def add_provider_status_routes(app: web.Application) -> None:
    """Register the provider status endpoint."""
    app.router.add_get("/v1/providers/status", provider_status)
