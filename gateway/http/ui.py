"""GET /ui: the status page for people, not programs. A browser signs in with HTTP Basic (any user name, the
key as the password); a client key sees its own policies, end users and models, the admin key everything
plus providers' breakers and canaries. What it shows is what the status and usage endpoints answer."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from gateway.budget.each import each_values
from gateway.budget.rate_status import rate_report
from gateway.budget.status import budget_report, visible_policies
from gateway.budget.usage import GroupBy, Scope, Totals, grouped_totals, ledger_rows
from gateway.budget.windows import window_for
from gateway.config.model import LOCAL_CALLER, CallerIdentity, Settings
from gateway.errors import StoreError, StoreUnavailable, Unauthorized
from gateway.http.appkeys import BUDGET, CONFIG
from gateway.http.auth import KnownTokens
from gateway.http.provider_status import provider_report
from gateway.http.ui_page import render_page

__all__ = ["basic_password", "ui_caller", "add_ui_routes"]

TOP = 10
_CHALLENGE = {"WWW-Authenticate": 'Basic realm="gateway", charset="UTF-8"'}


def basic_password(request: web.Request) -> str | None:
    """The password of an `Authorization: Basic ...` header (the user name is ignored), if any."""
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[2] or None


def ui_caller(request: web.Request, settings: Settings, known: KnownTokens) -> CallerIdentity:
    """The caller whose key is the Basic password; 401 with a Basic challenge otherwise (`auth: none`: local)."""
    caller = known.identify(settings, basic_password(request))
    if caller is not None:
        return caller
    if settings.server.auth == "none":
        return LOCAL_CALLER
    raise Unauthorized("Sign in with your gateway key as the password (any user name).", headers=_CHALLENGE)


async def _top_today(request: web.Request, settings: Settings, caller: CallerIdentity, now: float
                     ) -> dict[str, list[tuple[str | None, dict[str, Any]]]]:
    """Today's (UTC) top models and end users by cost, from the ledger rows the caller may see."""
    engine = request.app[BUDGET]
    since = window_for("daily", "UTC", now).start_ts
    kinds: tuple[GroupBy, ...] = ("model", "user")
    by: dict[GroupBy, dict[str | None, Totals]] = {kind: {} for kind in kinds}
    if engine.store is not None:      # one read of today's rows for both
        by, _ = await grouped_totals(ledger_rows(engine.store, since, now + 0.001), Scope.of(settings, caller), kinds)
    top: dict[str, list[tuple[str | None, dict[str, Any]]]] = {}
    for kind, groups in by.items():
        ranked = sorted(groups.items(), key=lambda item: (-item[1].cost_nano, -item[1].requests, str(item[0])))
        top[kind] = [(name, totals.as_json()) for name, totals in ranked[:TOP]]
    return top


async def status_page(request: web.Request, known: KnownTokens) -> web.Response:
    """GET /ui."""
    settings = request.app[CONFIG].current
    caller = ui_caller(request, settings, known)
    engine = request.app[BUDGET]
    now = engine.clock.now()
    policies = visible_policies(settings, caller, None)
    try:
        budgets = await budget_report(engine, policies, now, lambda p: each_values(settings, p, caller), settings)
        rates = await rate_report(engine, settings, policies, caller, now)
        top = await _top_today(request, settings, caller, now)
    except StoreError:
        raise StoreUnavailable("The budget store is unreachable; status cannot be read right now.") from None
    providers = await provider_report(request.app) if caller.admin else None
    page = render_page(caller.name, datetime.fromtimestamp(now, timezone.utc), budgets, rates, top, providers)
    return web.Response(text=page, content_type="text/html", headers={"Cache-Control": "no-store"})


def add_ui_routes(app: web.Application) -> None:
    """Register GET /ui."""
    known = KnownTokens()

    async def handler(request: web.Request) -> web.Response:
        return await status_page(request, known)

    app.router.add_get("/ui", handler)
