"""GET /v1/budget/status and GET /v1/budget/usage: a caller's budgets and spend, read from the store."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

import orjson
from aiohttp import web

from gateway.budget.each import each_values
from gateway.budget.engine import BudgetEngine
from gateway.budget.status import budget_report, visible_policies
from gateway.budget.usage import (
    GROUPS, NOW_INCLUDED_S, GroupBy, Scope, Totals, ledger_rows, parse_instant, usage_totals,
)
from gateway.budget.windows import window_for
from gateway.config.model import CallerIdentity, Policy, Settings
from gateway.domain.end_user import checked_id
from gateway.errors import InvalidRequest, StoreError, StoreUnavailable
from gateway.http.appkeys import BUDGET, CONFIG
from gateway.http.auth import authenticate

__all__ = ["add_budget_routes"]


StatusReader = Callable[[BudgetEngine, Settings, list[Policy], CallerIdentity, float],
                       Awaitable[list[dict[str, Any]]]]


async def scoped_status(request: web.Request, read: StatusReader) -> web.Response:
    """What `read` reports of the policies the caller may see (?policy=NAME for one), as a list; 503 while
    the store cannot be read."""
    settings = request.app[CONFIG].current
    caller = authenticate(request, settings)
    policies = visible_policies(settings, caller, request.query.get("policy"))
    engine = request.app[BUDGET]
    try:
        data = await read(engine, settings, policies, caller, engine.clock.now())
    except StoreError:
        raise StoreUnavailable("The budget store is unreachable; status cannot be read right now.") from None
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")


async def budget_status(request: web.Request) -> web.Response:
    """GET /v1/budget/status[?policy=NAME][&user=END_USER]: `user` shows that end user's `each: user` windows."""
    user = checked_id(request.query.get("user"), "user")

    async def budgets_of(engine: BudgetEngine, settings: Settings, policies: list[Policy], caller: CallerIdentity,
                         now: float) -> list[dict[str, Any]]:
        return await budget_report(engine, policies, now, lambda policy: each_values(settings, policy, caller, user),
                                   settings)

    return await scoped_status(request, budgets_of)


def _query(request: web.Request, now: float) -> tuple[float, float, GroupBy]:
    """since (default: the start of this UTC month), until (exclusive; default: now) and group_by (model)."""
    query = request.query
    since = parse_instant(query["since"], "since") if "since" in query else window_for("monthly", "UTC", now).start_ts
    until = parse_instant(query["until"], "until") if "until" in query else now + NOW_INCLUDED_S
    group_by = query.get("group_by", "model")
    if group_by not in GROUPS:
        raise InvalidRequest(f"'group_by' must be one of: {', '.join(GROUPS)}.", param="group_by")
    if since > until:
        raise InvalidRequest("'since' must not be after 'until'.", param="since")
    return since, until, group_by  # type: ignore[return-value]


def _iso(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, timezone.utc).isoformat()


async def budget_usage(request: web.Request) -> web.Response:
    """GET /v1/budget/usage?since=&until=&group_by=model|key|team|policy|provider|endpoint|user|session."""
    settings = request.app[CONFIG].current
    caller = authenticate(request, settings)
    engine = request.app[BUDGET]
    since, until, group_by = _query(request, engine.clock.now())
    groups: dict[str | None, Totals]
    if engine.store is None:
        groups, total = {}, Totals()
    else:
        await engine.settled()               # this replica's answered requests are in the ledger
        try:
            rows = ledger_rows(engine.store, since, until)
            groups, total = await usage_totals(rows, Scope.of(settings, caller), group_by)
        except StoreError:
            raise StoreUnavailable("The budget store is unreachable; usage cannot be read right now.") from None
    ranked = sorted(groups.items(), key=lambda item: (-item[1].cost_nano, -item[1].requests, str(item[0])))
    body = {"object": "list", "group_by": group_by, "since": _iso(since), "until": _iso(until),
            "data": [{"group": group, **totals.as_json()} for group, totals in ranked], "total": total.as_json()}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def add_budget_routes(app: web.Application) -> None:
    """Register GET /v1/budget/status and GET /v1/budget/usage."""
    app.router.add_get("/v1/budget/status", budget_status)
    app.router.add_get("/v1/budget/usage", budget_usage)
