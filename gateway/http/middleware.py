"""The one middleware: a request id and access record per request, OpenAI-shaped errors, observers told."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from gateway.errors import BudgetExceeded, GatewayError, PayloadTooLarge, RateLimited, error_body
from gateway.http.api_errors import shaped_for
from gateway.http.whole_reads import forget_read
from gateway.observability.access_log import AccessLog, AccessRecord, new_request_id

if TYPE_CHECKING:
    from gateway.observability.instruments import GatewayMetrics

__all__ = ["RECORD", "request_middleware", "error_response"]

RECORD: web.RequestKey[AccessRecord] = web.RequestKey("record", AccessRecord)
log = logging.getLogger("gateway")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(error: GatewayError, path: str = "") -> web.Response:
    """The JSON response for a gateway error, in the shape of the API at `path` (OpenAI's by default)."""
    return web.Response(body=orjson.dumps(shaped_for(path, error.status, error.body())), status=error.status,
                        content_type="application/json", headers=error.headers)


def _unexpected(path: str) -> web.Response:
    body = error_body("The gateway hit an internal error.", "server_error", "internal_error")
    return web.Response(body=orjson.dumps(shaped_for(path, 500, body)), status=500, content_type="application/json")


def _http_error(exc: web.HTTPException, path: str) -> web.Response:
    """aiohttp's own refusals (unknown path, wrong method) in the shape of the API at `path`."""
    code = "not_found" if exc.status == 404 else None
    body = shaped_for(path, exc.status, error_body(exc.reason, "invalid_request_error", code))
    return web.Response(body=orjson.dumps(body), status=exc.status, content_type="application/json")


def request_middleware(metrics: GatewayMetrics, access_log: AccessLog) -> Middleware:
    """The one middleware, bound to the app's metrics and access log (taken once, not from the app per request)."""

    @web.middleware
    async def serve_request(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Serve the request; turn every failure into OpenAI's error shape; then log and count it."""
        record = AccessRecord(new_request_id(), request.method, request.path)   # (keywords cost ~1.6k more)
        request[RECORD] = record
        refusal: BudgetExceeded | RateLimited | None = None
        metrics.requests_in_flight += 1
        try:
            response = await handler(request)
        except GatewayError as exc:
            record.error = exc.code
            refusal = exc if isinstance(exc, (BudgetExceeded, RateLimited)) else None
            response = error_response(exc, request.path)
        except web.HTTPRequestEntityTooLarge:
            record.error = "request_too_large"
            response = error_response(PayloadTooLarge("Request body is over the size limit."), request.path)
        except web.HTTPException as exc:
            record.error = exc.reason
            response = _http_error(exc, request.path)
        except Exception:
            log.exception("unhandled error serving request %s", record.request_id)
            record.error = "internal_error"
            response = _unexpected(request.path)
        finally:
            metrics.requests_in_flight -= 1
            forget_read(request.protocol)
        record.status = response.status
        if not response.prepared:
            response.headers["x-request-id"] = record.request_id
        access_log.write(record)
        metrics.request_served(record, refusal)
        return response

    return serve_request
