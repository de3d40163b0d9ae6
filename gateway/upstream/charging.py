"""What a request is charged, however it ends: finished, failed upstream, cut off, or abandoned.

    nothing reached an upstream, or every attempt failed     -> nothing (the reservation is released)
    the upstream answered an error status                   -> nothing (providers do not bill errors)
    an answer with the provider's own usage                 -> that usage at the serving model's price
    a stream without (readable) usage: cut off, ended by
    the gateway, or a quiet or garbled provider             -> prompt bound (or the input the stream reported
                                                               at its start: Anthropic's message_start) + one
                                                               token per output event
    an answer whose usage is missing or unreadable          -> the worst case, at the serving model's price
    a client that left while an upstream call was in flight -> the worst case, at the dearest target

Whatever the usage, the charge never exceeds the request's worst case (`Reservation.worst`, the amount
it reserved): usage over it is charged as the worst case. So a client that disconnects is never served
for free, and an upstream whose usage is garbled or inflated can neither switch a budget off nor drain it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

from gateway.domain.plan import Plan, Target
from gateway.domain.pricing import Charge, Usage, charge_for, cost_nano
from gateway.domain.worst_case import WorstCase, worst_charge
from gateway.upstream.dispatch import UpstreamReply
from gateway.upstream.stream_meter import Capture, StreamOutcome
from gateway.upstream.usage import ReadUsage

__all__ = ["Delivery", "Bill", "UsageUnknown", "bill_for"]

UsageUnknown = Literal["missing", "unreadable", "over_reserved"]
"""Why the upstream's usage was not charged: none sent, not counts, or more than the request reserved."""


@dataclass
class Delivery:
    """What the upstream answered and what reached the client, filled in as the request goes."""

    dispatched: bool = False          # an upstream call may have been made
    upstream_failed: bool = False     # every attempt ended in an upstream error
    reply: UpstreamReply | None = None
    stream: StreamOutcome | None = None
    usage: ReadUsage = None           # from a whole JSON answer
    body: bytes | None = None         # a whole answer, as the client got it
    capture: Capture | None = None    # given to a stream's outcome: fed what it relays (the response cache)
    bill: Bill | None = None          # what was charged, once settled


class Bill(NamedTuple):
    """A served request's charge: at whose price, for what usage, and why the upstream's usage was not used."""

    target: Target
    usage: Usage
    charge: Charge
    unknown: UsageUnknown | None = None


def bill_for(delivery: Delivery, plan: Plan, worst: WorstCase) -> Bill | None:
    """What to charge; None when nothing was served."""
    reply = delivery.reply
    if reply is None:
        if not delivery.dispatched or delivery.upstream_failed:
            return None
        dearest = max(plan.targets, key=lambda t: cost_nano(t.price, worst.usage))
        return _bounded(dearest, worst.usage, worst, None)
    if not 200 <= reply.response.status < 300:
        return None
    if delivery.stream is not None:
        return _stream_bill(reply.target, delivery.stream, worst)
    usage = delivery.usage
    if isinstance(usage, Usage):
        return _bounded(reply.target, usage, worst, None)
    return _bounded(reply.target, worst.usage, worst, "missing" if usage is None else "unreadable")


def _stream_bill(target: Target, outcome: StreamOutcome, worst: WorstCase) -> Bill:
    """A stream's usage chunk, else the estimate of what it relayed (unknown when the upstream garbled it)."""
    if outcome.usage is not None and not outcome.usage_unreadable:
        return _bounded(target, outcome.usage, worst, None)
    partial = outcome.partial
    if partial is None:
        estimate = worst.usage._replace(completion_tokens=outcome.content_events)   # (estimated already)
    else:   # the input side as the upstream counted it
        estimate = Usage(partial.prompt_tokens, max(partial.completion_tokens, outcome.content_events),
                         partial.cached_tokens, True, partial.cache_write_tokens, partial.cache_write_1h_tokens)
    unknown: UsageUnknown | None = "unreadable" if outcome.usage_unreadable else \
        "missing" if outcome.complete else None   # a stream cut short has its own error
    return _bounded(target, estimate, worst, unknown)


def _bounded(target: Target, usage: Usage, worst: WorstCase, unknown: UsageUnknown | None) -> Bill:
    """`usage` at the target's price, or the worst case when that is more than the request reserved.

    Only usage the upstream reported is `over_reserved` when held: the gateway's own estimate of a stream
    it cut may run past the bound by design (see EVENT_SLACK).
    """
    charge, amount = charge_for(target.price, usage), worst.amount
    if charge.usd_nano <= amount.usd_nano and charge.tokens <= amount.tokens:
        return Bill(target, usage, charge, unknown)
    held = worst_charge(target.price, worst)
    held = Charge(min(held.usd_nano, amount.usd_nano), min(held.tokens, amount.tokens), 1)
    return Bill(target, worst.usage, held, unknown or (None if usage.estimated else "over_reserved"))
