"""What a request is charged, however it ends: finished, failed upstream, cut off, or abandoned.

    nothing reached an upstream, or every attempt failed     -> nothing (the reservation is released)
    the upstream answered an error status                   -> nothing (providers do not bill errors)
    an answer with the provider's own usage                 -> that usage at the serving provider's price
    a stream without usage (cut off, or a quiet provider)   -> prompt bound + one token per content event
    an answer whose usage is unknown, or a client that left
    while an upstream call was in flight                    -> the worst case, at the dearest provider

So a client that disconnects is never served for free: the gateway may over-count, never under-count.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.budget.worst_case import output_cap
from gateway.pricing import Usage, cost_nano
from gateway.proxy.dispatch import UpstreamReply
from gateway.proxy.plan import Plan, Target
from gateway.proxy.relay import StreamOutcome
from gateway.proxy.request import ProxyRequest
from gateway.tokens import prompt_upper_bound

__all__ = ["Delivery", "billable_usage"]


@dataclass
class Delivery:
    """What the upstream answered and what reached the client, filled in as the request goes."""

    dispatched: bool = False          # an upstream call may have been made
    upstream_failed: bool = False     # every attempt ended in an upstream error
    reply: UpstreamReply | None = None
    stream: StreamOutcome | None = None
    usage: Usage | None = None        # from a whole JSON answer


def worst_usage(req: ProxyRequest, plan: Plan) -> Usage:
    """The most the request can have used: the bound its reservation was made for."""
    return Usage(prompt_tokens=prompt_upper_bound(req.payload), completion_tokens=output_cap(req, plan, ()),
                 estimated=True)


def stream_estimate(req: ProxyRequest, outcome: StreamOutcome) -> Usage:
    """A stream's usage when the upstream sent none."""
    return Usage(prompt_tokens=prompt_upper_bound(req.payload), completion_tokens=outcome.content_events,
                 estimated=True)


def billable_usage(delivery: Delivery, req: ProxyRequest, plan: Plan) -> tuple[Target, Usage] | None:
    """Whose price and what usage to charge; None when nothing was served."""
    reply = delivery.reply
    if reply is None:
        if not delivery.dispatched or delivery.upstream_failed:
            return None
        usage = worst_usage(req, plan)
        return max(plan.targets, key=lambda t: cost_nano(t.price, usage)), usage
    if not 200 <= reply.response.status < 300:
        return None
    if delivery.stream is not None:
        return reply.target, delivery.stream.usage or stream_estimate(req, delivery.stream)
    return reply.target, delivery.usage or worst_usage(req, plan)
