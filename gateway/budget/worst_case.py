"""The most a request can cost, reserved before any upstream call."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.config.model import Policy
from gateway.pricing import Charge, Usage, cost_nano
from gateway.proxy.plan import Plan
from gateway.proxy.request import ProxyRequest
from gateway.tokens import prompt_upper_bound

__all__ = ["worst_case_charge"]


def output_cap(req: ProxyRequest, plan: Plan, policies: Sequence[Policy]) -> int:
    """Completion tokens to reserve: the request's max_tokens, else the tightest policy or model cap."""
    if req.endpoint.kind == "embeddings":
        return 0
    if req.max_tokens is not None:
        return req.max_tokens
    caps = [p.max_output_tokens for p in policies if p.max_output_tokens]
    return min(caps) if caps else max(t.price.max_output_tokens for t in plan.targets)


def worst_case_charge(req: ProxyRequest, plan: Plan, policies: Sequence[Policy]) -> Charge:
    """Upper bound of the request's charge on any provider of the plan (failover may pick a dearer one)."""
    usage = Usage(prompt_tokens=prompt_upper_bound(req.payload), completion_tokens=output_cap(req, plan, policies))
    dearest = max(cost_nano(target.price, usage) for target in plan.targets)
    return Charge(usd_nano=dearest, tokens=usage.total_tokens, requests=1)
