"""Pass two for model prices: USD per 1M tokens, exact Decimals, never negative."""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal

from gateway.config.model import ModelPrice
from gateway.config.node import Node, at_least

__all__ = ["Prices", "decode_prices", "target_price"]

Prices = dict[str, ModelPrice] | None  # None: the prices could not be read, so checks against them are skipped

_DEFAULT = ModelPrice(input=Decimal(0), output=Decimal(0))


def decode_prices(models: Node) -> dict[str, ModelPrice]:
    """The prices in a mapping of model name -> price."""
    return {model: _price(node) for model, node in models.entries()}


def _price(node: Node) -> ModelPrice:
    """One model's price."""
    return ModelPrice(
        input=node.at("input", required=True).decimal(_DEFAULT.input, at_least(0)),
        output=node.at("output", required=True).decimal(_DEFAULT.output, at_least(0)),
        cached_input=node.at("cached_input").decimal(None, at_least(0)),
        max_output_tokens=node.at("max_output_tokens").integer(_DEFAULT.max_output_tokens, at_least(0)),
    )


def target_price(prices: Mapping[str, ModelPrice], model: str, upstream_model: str | None) -> ModelPrice | None:
    """The pricing rule: a route target is charged its upstream model's price, else the client model's.

    None when neither is priced: a request that may reach that target is refused before any upstream call.
    """
    if upstream_model is not None:
        price = prices.get(upstream_model)
        if price is not None:
            return price
    return prices.get(model)
