"""From a client's model name to the priced providers that may serve it, in order."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config.model import ModelPrice, Settings
from gateway.errors import NotFound

__all__ = ["Target", "Plan", "plan_for", "PlanCache"]

MAX_PLANS = 1024   # models kept per config; more are dropped together and planned again


@dataclass(frozen=True)
class Target:
    """One provider that can serve the request, with the model name it knows and its price."""

    provider: str
    upstream_model: str
    price: ModelPrice


@dataclass(frozen=True)
class Plan:
    """The targets of a request, primary first; the route pattern is its metrics label."""

    model: str
    route: str
    targets: tuple[Target, ...]


def plan_for(settings: Settings, model: str) -> Plan:
    """The plan for `model`; a model with no route or no price is refused before any upstream call."""
    route = settings.route_for(model)
    if route is None:
        raise NotFound(f"The model '{model}' does not exist or you do not have access to it.", param="model")
    targets = []
    for target in route.targets:
        upstream_model = target.upstream_model or model
        price = settings.price_for(upstream_model) or settings.price_for(model)
        if price is not None:
            targets.append(Target(target.provider, upstream_model, price))
    if not targets:
        raise NotFound(f"The model '{model}' has no price configured, so the gateway will not serve it.",
                       param="model")
    return Plan(model, route.pattern, tuple(targets))


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
