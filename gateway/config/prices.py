"""The pricing rule: which price a route target is charged."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.config.model import ModelPrice

__all__ = ["target_price"]


def target_price(prices: Mapping[str, ModelPrice], model: str, upstream_model: str | None) -> ModelPrice | None:
    """The pricing rule: a route target is charged its upstream model's price, else the client model's.

    None when neither is priced: a request that may reach that target is refused before any upstream call.
    """
    if upstream_model is not None:
        price = prices.get(upstream_model)
        if price is not None:
            return price
    return prices.get(model)
