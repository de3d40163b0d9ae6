"""Sending a request to the plan's providers until one answers."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp

from gateway.errors import UpstreamFailure
from gateway.proxy.plan import Plan, Target
from gateway.proxy.providers import ProviderPool
from gateway.proxy.request import ProxyRequest, upstream_body

__all__ = ["UpstreamReply", "dispatch"]


@dataclass
class UpstreamReply:
    """The upstream answer chosen to serve the client (not yet read)."""

    target: Target
    response: aiohttp.ClientResponse
    attempts: int


async def dispatch(req: ProxyRequest, plan: Plan, pool: ProviderPool) -> UpstreamReply:
    """Call the primary provider once and return its answer, whatever its status."""
    target = plan.targets[0]
    client = pool[target.provider]
    try:
        response = await client.post(req.endpoint.path, upstream_body(req, target.upstream_model))
    except asyncio.TimeoutError:
        raise UpstreamFailure(f"Provider '{target.provider}' timed out.", status=504,
                              code="upstream_timeout") from None
    except aiohttp.ClientError as exc:
        raise UpstreamFailure(f"Provider '{target.provider}' is unreachable ({type(exc).__name__}).",
                              code="upstream_unreachable") from None
    return UpstreamReply(target, response, attempts=1)
