"""Reading a client's proxy request off the connection: JSON only, within the body limit and the client timeout."""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway.config.model import ServerConfig
from gateway.domain.api_requests import parse_api_request
from gateway.domain.end_user import SESSION_HEADER, USER_HEADER
from gateway.domain.request import Endpoint, ProxyRequest, media_type_of, parse_request
from gateway.errors import PayloadTooLarge, RequestTimeout, UnsupportedMediaType

__all__ = ["read_body", "read_proxy_request"]


async def read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    """The raw body, refusing non-JSON content types, bodies over `limit` bytes and slow senders."""
    media_type = media_type_of(request.headers.get("Content-Type"))
    if media_type != "application/json":
        raise UnsupportedMediaType(
            f"Unsupported content type '{media_type}': send 'Content-Type: application/json'.")
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"Request body of {request.content_length} bytes is over the {limit}-byte limit.")
    try:
        if request.content.is_eof():         # the whole body has arrived: reading it cannot wait
            return await request.read()
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"Request body is over the {limit}-byte limit.") from None
    except TimeoutError:
        raise RequestTimeout(f"The request body was not received within {timeout_s:g} s.") from None


async def read_proxy_request(request: web.Request, endpoint: Endpoint, server: ServerConfig) -> ProxyRequest:
    """Read and check a client request for `endpoint` (with its end user and session, see domain.end_user)."""
    body = await read_body(request, server.max_body_bytes, server.client_timeout_s)
    headers = request.headers
    user, session = headers.get(USER_HEADER), headers.get(SESSION_HEADER)
    if endpoint.api == "openai-chat":
        return parse_request(endpoint, body, user, session)
    return parse_api_request(endpoint, body, user, session)
