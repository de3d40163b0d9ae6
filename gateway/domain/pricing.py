"""Exact cost: prices are Decimals per 1M tokens at the edges, money inside is integer nano-USD.

One nano-USD is 1e-9 USD. A price with at most three decimals per 1M tokens (0.14, 2.50, 0.075)
makes every token cost a whole number of nano-USD, so sums are exact; finer prices are rounded up
per request (never under-charged by more than 1 nano-USD a request).
"""

from __future__ import annotations

import functools
from decimal import ROUND_CEILING, Decimal
from typing import NamedTuple

from gateway.config.model import ModelPrice

__all__ = ["NANO_PER_USD", "MAX_AMOUNT",
           "Usage", "Charge", "cost_nano", "nano_to_usd", "format_usd", "usd_to_nano", "charge_for"]

NANO_PER_USD = 1_000_000_000
MAX_AMOUNT = 2**53 - 1
"""Largest amount or limit: Redis Lua numbers are doubles, exact only up to 2^53 (~9M USD in nano-USD)."""
_NANO_PER_MTOK_UNIT = Decimal(NANO_PER_USD) / Decimal(1_000_000)  # nano-USD per token at 1 USD/1M


class Usage(NamedTuple):
    """Tokens used by one response; `estimated` when the gateway counted them itself.

    `prompt_tokens` counts every input token: `cached_tokens` (read from the provider's prompt cache) and
    `cache_write_tokens` (written to it, Anthropic) are parts of it, priced at their own rates, and
    `cache_write_1h_tokens` (written for an hour) are a part of the writes, at theirs.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    estimated: bool = False
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class Charge(NamedTuple):
    """What one request costs against a budget, in every unit a budget can limit.

    A NamedTuple, not a dataclass: several are made per request, and tuples are the cheapest value type.
    """

    usd_nano: int = 0
    tokens: int = 0
    requests: int = 0

    def __add__(self, other: Charge) -> Charge:  # type: ignore[override]
        return Charge(self.usd_nano + other.usd_nano, self.tokens + other.tokens, self.requests + other.requests)


def usd_to_nano(usd: Decimal) -> int:
    """Decimal USD to integer nano-USD, rounded up."""
    return int((usd * NANO_PER_USD).to_integral_value(rounding=ROUND_CEILING))


def nano_to_usd(nano: int) -> Decimal:
    """Integer nano-USD to Decimal USD (exact)."""
    return Decimal(nano) / NANO_PER_USD


@functools.lru_cache(maxsize=4096)    # a log line formats one or two; the same few amounts come again and again
def format_usd(nano: int) -> str:
    """Integer nano-USD as a plain decimal string without trailing zeros: 38550 -> '0.00003855'."""
    sign, nano = ("-", -nano) if nano < 0 else ("", nano)
    whole, fraction = divmod(nano, NANO_PER_USD)
    return sign + f"{whole}.{fraction:09d}".rstrip("0").rstrip(".")


def cost_nano(price: ModelPrice, usage: Usage) -> int:
    """Cost of `usage` at `price` in nano-USD; cached prompt tokens are billed at the cached price, prompt
    tokens written to the provider's cache at the cache-write price (for an hour: the 1-hour one).

    Prices of at most three decimals per 1M tokens (nearly all) cost whole nano-USD per token, so
    integers give the exact cost; finer prices take the Decimal path and round up.
    """
    cached = min(usage.cached_tokens, usage.prompt_tokens)
    written = written_1h = usage.cache_write_tokens
    if written:
        written = min(written, usage.prompt_tokens - cached)
        written_1h = min(usage.cache_write_1h_tokens, written)
    rates = price.whole_nano_per_token
    if rates is not None:
        cost = (usage.prompt_tokens - cached) * rates[0] + cached * rates[1] + usage.completion_tokens * rates[2]
        if written:
            cost += written * (rates[3] - rates[0]) + written_1h * (rates[4] - rates[3])
        return cost
    per_million = (
        (usage.prompt_tokens - cached - written) * price.input
        + cached * price.cached_rate
        + (written - written_1h) * price.cache_write_rate
        + written_1h * price.cache_write_1h_rate
        + usage.completion_tokens * price.output
    )
    return int((per_million * _NANO_PER_MTOK_UNIT).to_integral_value(rounding=ROUND_CEILING))


def charge_for(price: ModelPrice, usage: Usage) -> Charge:
    """The budget charge of one served request."""
    return Charge(cost_nano(price, usage), usage.prompt_tokens + usage.completion_tokens, 1)   # (once a request)
