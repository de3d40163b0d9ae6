"""`GET /v1/providers/status`: each provider's circuit breaker, for admins only.

Anyone else gets the same 404 as an unknown path, so the endpoint does not reveal that it exists.
Only breaker state is shown: never a key, never a base URL. With canary routes, `canaries` lists each one's
step and arm figures, read from the store (so every replica answers the same; null when it cannot be read). Under `gateway run --workers N` each worker
has its own breakers: a provider's entry is then its worst worker's (open before half-open before
closed, then the higher failure rate) and `workers` lists every worker's, by index.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import orjson
from aiohttp import web

from gateway.errors import StoreError, Unauthorized
from gateway.http.appkeys import CONFIG, PEERS, RESILIENCE, ROUTER
from gateway.http.auth import authenticate
from gateway.routing.report import canary_entry

__all__ = ["provider_status", "provider_report", "add_provider_status_routes"]

_FIELDS = ("provider", "state", "failure_rate", "calls_in_window", "open_until", "consecutive_opens")
_SEVERITY = {"closed": 0, "half_open": 1, "open": 2}


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


def _every_worker(workers: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One entry per provider from every worker's snapshots: the worst worker's fields, and each worker's."""
    by_provider: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for index, snapshots in enumerate(workers):
        for snapshot in snapshots:
            by_provider.setdefault(snapshot["provider"], []).append((index, snapshot))
    data = []
    for seen in by_provider.values():
        _, worst = max(seen, key=lambda item: (_SEVERITY[item[1]["state"]], item[1]["failure_rate"]))
        entry = _entry(worst)
        entry["workers"] = [{"worker": index, **_entry(snapshot)} for index, snapshot in seen]
        for worker in entry["workers"]:
            del worker["provider"]
        data.append(entry)
    return data


async def provider_status(request: web.Request) -> web.Response:
    """The breaker state of every configured provider, in OpenAI's list shape."""
    _require_admin(request)
    return web.Response(body=orjson.dumps(await provider_report(request.app)), content_type="application/json")


async def provider_report(app: web.Application) -> dict[str, Any]:
    """Every provider's breaker (every worker's under --workers) and, with canary routes, the canaries."""
    own = app[RESILIENCE].snapshot()
    peers = app.get(PEERS)
    data = [_entry(snapshot) for snapshot in own] if peers is None else \
        _every_worker(await peers.everyone("breakers", own))
    body: dict[str, Any] = {"object": "list", "data": data}
    if any(route.canary is not None for route in app[CONFIG].current.routes):
        body["canaries"] = await _canaries(app)
    return body


async def _canaries(app: web.Application) -> list[dict[str, Any]] | None:
    """Each canary as the store holds it (every replica shows the same); None when the store cannot say."""
    try:
        return [canary_entry(run, record) for run, record in await app[ROUTER].canaries.read(app[CONFIG].current)]
    except StoreError:
        return None


def add_provider_status_routes(app: web.Application) -> None:
    """Register the provider status endpoint; under --workers, also tell sibling workers this one's breakers."""
    app.router.add_get("/v1/providers/status", provider_status)
    peers = app.get(PEERS)
    if peers is not None:
        peers.provide("breakers", app[RESILIENCE].snapshot)
