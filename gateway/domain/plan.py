"""From a client's model name to the priced providers that may serve it, in order."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from gateway.config.model import ModelPrice, RouteTarget, Settings
from gateway.config.prices import target_price
from gateway.errors import NotFound

__all__ = ["Target", "Plan", "plan_for", "PlanCache"]

MAX_PLANS = 1024   # models kept per config; more are dropped together and planned again


@dataclass(frozen=True)
class Target:
    """One provider that can serve the request, with the model name it knows and that model's price."""

    provider: str
    upstream_model: str
    price: ModelPrice


@dataclass(frozen=True)
class Plan:
    """The targets of a request, primary first; the route pattern is its metrics label."""

    model: str
    route: str
    targets: tuple[Target, ...]

    @cached_property
    def prices(self) -> tuple[ModelPrice, ...]:
        """The targets' distinct prices (usually one: a model costs the same on every provider)."""
        return tuple({id(target.price): target.price for target in self.targets}.values())


def plan_for(settings: Settings, model: str) -> Plan:
    """The plan for `model`, every target priced (see `target_price`); else refused before any upstream call.

    A target is never skipped for want of a price: failover may reach any of them, so each must be priced.
    """
    route = settings.route_for(model)
    if route is None:
        raise NotFound(f"The model '{model}' does not exist or you do not have access to it.", param="model")
    targets = []
    for target in route.targets:
        price = target_price(settings.pricing, model, target.upstream_model)
        if price is None:
            raise NotFound(_unpriced(model, target), param="model")
        targets.append(Target(target.provider, target.upstream_model or model, price))
    return Plan(model, route.pattern, tuple(targets))


def _unpriced(model: str, target: RouteTarget) -> str:
    if target.upstream_model is None:
        return f"The model '{model}' has no price configured, so the gateway will not serve it."
    return (f"The model '{model}' has no price configured for provider '{target.provider}' (neither "
            f"'{target.upstream_model}' nor '{model}' has a price), so the gateway will not serve it.")


class PlanCache:
    """The plans of one Settings by model: routing and pricing are worked out once per config."""

    def __init__(self) -> None:
        self._settings: Settings | None = None
        self._plans: dict[str, Plan] = {}

    def plan_for(self, settings: Settings, model: str) -> Plan:
        """`plan_for(settings, model)`, cached until a reload swaps the Settings."""
        if settings is not self._settings or len(self._plans) >= MAX_PLANS:
            self._settings, self._plans = settings, {}
        plan = self._plans.get(model)
        if plan is None:
            plan = self._plans[model] = plan_for(settings, model)
        return plan
