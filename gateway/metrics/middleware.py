"""The outermost middleware: requests in flight, and every answered request's access record observed."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.appkeys import METRICS
from gateway.errors import BudgetExceeded
from gateway.middleware import FAILURE, RECORD

__all__ = ["metrics_middleware"]


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Track the request in flight; once the error middleware has answered, count what it served."""
    metrics = request.app[METRICS]
    metrics.in_flight.inc()
    try:
        response = await handler(request)
    finally:
        metrics.in_flight.dec()
    failure = request.get(FAILURE)
    if isinstance(failure, BudgetExceeded):
        metrics.budget_refused(failure)
    metrics.request_served(request[RECORD])
    return response
