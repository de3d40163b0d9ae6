"""What a client hears of rate limits: the 429 of a refused request, and OpenAI's x-ratelimit-* headers.

A rate refusal passes (`x-should-retry: true`, unlike a budget's): `Retry-After` (and `retry-after-ms`,
which the OpenAI SDK reads first) is the time until the request fits in the window. A request larger
than the limit itself never fits: it is refused without a retry.

The headers name the tightest matching policy limit: of the requests limits the one with the fewest
requests remaining, of the tokens limits the one with the fewest tokens remaining; `reset` is the time
until what its window holds has all left it (a sliding window empties bucket by bucket). Providers'
own limits are the gateway's business, not the client's: they never appear in these headers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from gateway.budget.rate_slots import RateSlot
from gateway.budget.store import ReserveOutcome
from gateway.errors import RateLimited

__all__ = ["rate_limited", "rate_headers", "duration"]


def duration(seconds: float) -> str:
    """A wait as OpenAI writes it in x-ratelimit-reset-*: 250ms, 20s, 6m0s, 1h0m0s."""
    if seconds < 1:
        return f"{max(1, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def rate_limited(slot: RateSlot, outcome: ReserveOutcome, now: float) -> RateLimited:
    """The 429 of a request a rate window, a max_concurrent or every provider's own limit refused."""
    unit = outcome.refused_unit or "requests"
    wait = outcome.retry_after
    who = f"policy '{slot.policy.name}'" if slot.policy is not None else f"provider '{slot.provider}'"
    if slot.limit is None:
        assert slot.policy is not None
        message = (f"Rate limit reached: policy '{slot.policy.name}' allows {slot.policy.max_concurrent} "
                   "requests in flight at once; try again when one has finished.")
        error = RateLimited(message, headers={"Retry-After": "1", "x-should-retry": "true"})
        error.kind = "concurrent"
    else:
        limit = slot.limit.requests if unit == "requests" else slot.limit.tokens
        if wait is not None and wait < 0:
            message = (f"Request too large: {who} allows {limit} {unit} per {slot.limit.per}, and this request "
                       f"may use more than that on its own (lower max_tokens or the prompt).")
            headers = {"x-should-retry": "false"}
        else:
            seconds = wait if wait is not None else 1.0
            message = (f"Rate limit reached: {who} allows {limit} {unit} per {slot.limit.per}; "
                       f"try again in {duration(seconds)}.")
            headers = {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(math.ceil(seconds * 1000)),
                       "x-should-retry": "true"}
        if slot.policy is not None:
            used = outcome.used[0] if outcome.used else limit
            headers |= {f"x-ratelimit-limit-{unit}": str(limit),
                        f"x-ratelimit-remaining-{unit}": str(max(0, (limit or 0) - (used or 0))),
                        f"x-ratelimit-reset-{unit}": duration(slot.resets_in(now))}
        error = RateLimited(message, headers=headers)
        error.kind = unit
    error.type = "tokens" if error.kind == "tokens" else "requests"
    error.policy = slot.policy.name if slot.policy is not None else None
    error.provider = slot.provider if slot.policy is None else None
    return error


def rate_headers(slots: Sequence[object], used: Sequence[int], now: float) -> dict[str, str] | None:
    """x-ratelimit-* of the tightest policy window, from what the store says each one holds (None: no window)."""
    tightest: dict[str, tuple[int, int, RateSlot]] = {}
    position = 0
    for slot in slots:
        if not isinstance(slot, RateSlot) or slot.limit is None or slot.group:
            continue
        held = used[position:position + 2]
        position += 2
        if len(held) < 2:
            break
        for unit, limit, count in (("requests", slot.limit.requests, held[0]), ("tokens", slot.limit.tokens, held[1])):
            if limit is not None and (unit not in tightest or limit - count < tightest[unit][0] - tightest[unit][1]):
                tightest[unit] = (limit, count, slot)
    if not tightest:
        return None
    headers: dict[str, str] = {}
    for unit, (limit, count, slot) in tightest.items():
        headers |= {f"x-ratelimit-limit-{unit}": str(limit), f"x-ratelimit-remaining-{unit}": str(max(0, limit - count)),
                    f"x-ratelimit-reset-{unit}": duration(slot.resets_in(now))}
    return headers
