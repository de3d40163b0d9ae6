"""The most a request can use and cost: computed once, reserved, and carried to settlement.

The output cap counts every completion the request may produce: `n` (or `best_of`, which the
provider generates in full and bills) choices, for each prompt of a /v1/completions prompt list.
An absurd worst case is held at MAX_AMOUNT (the most a budget store holds), which no budget limit exceeds.

The same WorstCase bounds what the request is charged (usage unknown or larger is charged as this)
and how much output a stream may relay, whether or not a policy reserved it in a store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from gateway.config.model import ModelPrice, Policy
from gateway.domain.api_requests import MESSAGES, api_prompt_bound
from gateway.domain.plan import Plan
from gateway.domain.pricing import MAX_AMOUNT, Charge, Usage, charge_for, cost_nano
from gateway.domain.request import ProxyRequest
from gateway.domain.tokens import NON_TEXT_PART_TOKENS, prompt_upper_bound

__all__ = ["WorstCase", "worst_case", "worst_charge", "completions_per_request", "prompt_bound"]

_ONE_HOUR = b'"1h"'     # a cache_control's ttl in the body's JSON (a quote inside a string is escaped)


class WorstCase(NamedTuple):
    """A request's bound: its prompt bound and output cap (estimated usage; on /v1/messages every prompt token
    written to the cache, for an hour if the body may ask it), and their cost at the dearest target."""

    usage: Usage
    amount: Charge


def prompt_count(prompt: Any) -> int:
    """Prompts in a /v1/completions `prompt`: a list of strings or token lists is one per item."""
    if isinstance(prompt, list) and prompt and not all(isinstance(item, int) for item in prompt):
        return len(prompt)
    return 1


def completions_per_request(req: ProxyRequest) -> int:
    """How many completions the request may generate (n and best_of are checked positive ints)."""
    payload = req.payload
    choices = max(payload.get("n") or 1, payload.get("best_of") or 1)
    if req.endpoint.kind == "completions":
        return choices * prompt_count(payload.get("prompt"))
    return choices


def output_cap(req: ProxyRequest, plan: Plan, policies: Sequence[Policy]) -> int:
    """Completion tokens to reserve: the per-completion cap times the completions the request asks for."""
    if req.endpoint.kind == "embeddings":
        return 0
    return completion_cap(req, plan, policies) * completions_per_request(req)


def completion_cap(req: ProxyRequest, plan: Plan, policies: Sequence[Policy]) -> int:
    """Tokens of one completion: the request's max_tokens, else the tightest policy or model cap."""
    if req.max_tokens is not None:
        return req.max_tokens
    caps = [p.max_output_tokens for p in policies if p.max_output_tokens]
    return min(caps) if caps else max(t.price.max_output_tokens for t in plan.targets)


def prompt_bound(req: ProxyRequest, image_tokens: int = NON_TEXT_PART_TOKENS) -> int:
    """The request's prompt token bound, by its API, each image counted `image_tokens` (a model's price may say
    more than the default, which `auto` route rules read)."""
    if req.endpoint.api == "openai-chat":
        return prompt_upper_bound(req.payload, image_tokens)
    return api_prompt_bound(req, image_tokens)


def worst_case(req: ProxyRequest, plan: Plan, policies: Sequence[Policy]) -> WorstCase:
    """The request's bound on any provider of the plan (failover may pick a dearer one).

    On /v1/messages every prompt token may be written to the provider's cache, which may cost more than input.
    """
    completion = output_cap(req, plan, policies)
    prices = plan.prices
    if len(prices) == 1 and req.endpoint.api == "openai-chat":
        prompt = prompt_upper_bound(req.payload, prices[0].image_tokens)
        usage = Usage(prompt, completion, 0, True)   # estimated
        dearest = cost_nano(prices[0], usage)
    else:
        prompts = {tokens: prompt_bound(req, tokens) for tokens in {price.image_tokens for price in prices}}
        prompt = max(prompts.values())
        usage = _worst_usage(req, prompt, completion)
        dearest = max(cost_nano(price, each) for price in prices
                      for each in _variants(_worst_usage(req, prompts[price.image_tokens], completion)))
    return WorstCase(usage, Charge(min(dearest, MAX_AMOUNT), min(prompt + completion, MAX_AMOUNT), 1))


def worst_charge(price: ModelPrice, worst: WorstCase) -> Charge:
    """The worst case at `price`: the dearest of the usages it stands for (what usage that is unknown, or above
    the reservation, is charged before the reservation caps it)."""
    return max(charge_for(price, usage) for usage in _variants(worst.usage))


def _worst_usage(req: ProxyRequest, prompt: int, completion: int) -> Usage:
    """The worst usage of a prompt and a completion: on /v1/messages every prompt token written to the cache, for
    an hour when the body names that time to live ("1h" as a JSON string: any, to be safe)."""
    usage = Usage(prompt, completion, 0, True)   # estimated
    if req.endpoint is not MESSAGES:
        return usage
    return usage._replace(cache_write_tokens=prompt, cache_write_1h_tokens=prompt if _ONE_HOUR in req.body else 0)


def _variants(usage: Usage) -> tuple[Usage, ...]:
    """The usages a worst usage stands for: its cache writes as they are, for five minutes, or none (which costs
    most depends on the price)."""
    if not usage.cache_write_tokens:
        return (usage,)
    plain = usage._replace(cache_write_tokens=0, cache_write_1h_tokens=0)
    if not usage.cache_write_1h_tokens:
        return plain, usage
    return plain, usage._replace(cache_write_1h_tokens=0), usage
