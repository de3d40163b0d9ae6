"""GET /v1/rate_limits/status: each rate window's and in-flight counter's use, scoped to the caller."""

from __future__ import annotations

from aiohttp import web

from gateway.budget.rate_status import rate_report
from gateway.http.budget import scoped_status

__all__ = ["add_rate_limit_routes"]


async def rate_status(request: web.Request) -> web.Response:
    """GET /v1/rate_limits/status[?policy=NAME]."""
    return await scoped_status(request, rate_report)


def add_rate_limit_routes(app: web.Application) -> None:
    """Register GET /v1/rate_limits/status."""
    app.router.add_get("/v1/rate_limits/status", rate_status)
