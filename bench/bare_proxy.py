#!/usr/bin/env python3
"""The bench's reference: the least an aiohttp pass-through proxy can do, so what the gateway adds shows.

One pooled ClientSession; forwards the method, path, query, body and end-to-end headers; answers with the
upstream's status, content type and body; relays text/event-stream answers chunk by chunk as they come.
No auth, no logging, no retries, no accounting: the physical limit of a Python aiohttp proxy on one core.

    python bench/bare_proxy.py --port 18001 --upstream http://127.0.0.1:18000
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade", "host", "content-length", "accept-encoding"})
SESSION = web.AppKey("session", ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def forward(request: web.Request) -> web.StreamResponse:
    """Send the request on upstream and its answer back: streamed for SSE, whole otherwise."""
    headers = {name: value for name, value in request.headers.items() if name.lower() not in HOP_BY_HOP}
    body = await request.read()
    async with request.app[SESSION].request(request.method, request.app[UPSTREAM] + request.path_qs,
                                            headers=headers, data=body) as upstream:
        content_type = upstream.headers.get("Content-Type", "application/json")
        if not content_type.startswith("text/event-stream"):
            return web.Response(status=upstream.status, body=await upstream.read(),
                                headers={"Content-Type": content_type})
        response = web.StreamResponse(status=upstream.status,
                                      headers={"Content-Type": content_type, "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except ConnectionResetError:      # the client left mid-stream (wrk stopping): nothing to answer
            pass
        return response


def create_app(upstream: str) -> web.Application:
    """The proxy app, its session opened on start-up and closed on clean-up."""
    async def session(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = ClientSession(connector=TCPConnector(limit=0, ttl_dns_cache=None), auto_decompress=False,
                                     timeout=ClientTimeout(total=300))
        yield
        await app[SESSION].close()

    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[UPSTREAM] = upstream.rstrip("/")
    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed (as the gateway runs), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL the request path is appended to")
    args = parser.parse_args()
    web.run_app(create_app(args.upstream), host=args.host, port=args.port, access_log=None, print=None,
                loop=event_loop())


if __name__ == "__main__":
    main()
