"""Keeping a request's plan to the providers that serve its endpoint's wire API (a provider's `apis`).

Under a config where every provider serves an API (openai-chat, by default) the plan is used as it is: a
set lookup per request. Otherwise the plan loses the targets whose provider does not serve the API, in their
order (worked out once per plan and API); a plan left with none is a 404 before any budget is reserved.
"""

from __future__ import annotations

from typing import get_args

from gateway.config.model import Api, Settings
from gateway.domain.plan import Plan
from gateway.domain.request import Endpoint
from gateway.errors import NotFound

__all__ = ["ApiPlans", "MAX_API_PLANS"]

MAX_API_PLANS = 4096   # plans kept per config; more are dropped together and worked out again


class ApiPlans:
    """The plans of one Settings kept to each API's providers."""

    def __init__(self) -> None:
        self._settings: Settings | None = None
        self._partial: frozenset[str] = frozenset()     # APIs some provider does not serve
        self._plans: dict[tuple[int, str], tuple[Plan, Plan]] = {}   # (id(plan), api) -> (plan, kept)

    def serving(self, settings: Settings, plan: Plan, endpoint: Endpoint) -> Plan:
        """`plan` with only the targets whose provider serves `endpoint`'s API; NotFound when none does."""
        if settings is not self._settings:
            self._forget(settings)
        api = endpoint.api
        if api not in self._partial:
            return plan
        known = self._plans.get((id(plan), api))
        if known is None:
            if len(self._plans) >= MAX_API_PLANS:
                self._plans = {}
            known = self._plans[(id(plan), api)] = (plan, _kept(settings, plan, endpoint))
        return known[1]

    def _forget(self, settings: Settings) -> None:
        """Start over under a new Settings."""
        providers = settings.providers.values()
        self._settings, self._plans = settings, {}
        self._partial = frozenset(api for api in get_args(Api) if any(api not in p.apis for p in providers))


def _kept(settings: Settings, plan: Plan, endpoint: Endpoint) -> Plan:
    """The plan's targets that serve the endpoint's API, in order."""
    providers = settings.providers
    targets = tuple(t for t in plan.targets if t.provider in providers and endpoint.api in providers[t.provider].apis)
    if not targets:
        raise NotFound(f"No provider of the model '{plan.model}' serves {endpoint.path} (its API, "
                       f"'{endpoint.api}', is in no provider's `apis`).", param="model")
    return plan if len(targets) == len(plan.targets) else Plan(plan.model, plan.route, targets)
