"""The routing step of a request: its client model -> the plan that serves it, and the arm it was sent down.

A plain route has one plan (cached per config, `PlanCache`). A split or canary route has one plan per arm
(the arm first, the others after it as failover targets, in the order listed), chosen per request by
weight or canary step. A rules route picks a model by its first matching rule, then routes that model.
Choosers are built once per config and model, so a request pays a dict lookup and, for a split or a
canary, one random or hashed point. No store call happens here: a canary's step is the cached one
(`gateway.routing.canary_runs`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from gateway.config.model import CallerIdentity, Settings
from gateway.config.routes import Route
from gateway.domain.plan import Plan, PlanCache, plan_for
from gateway.domain.request import Endpoint, ProxyRequest
from gateway.routing.apis import ApiPlans
from gateway.routing.rules import Traits, first_match
from gateway.routing.split import Weights, stable_point

if TYPE_CHECKING:
    from gateway.routing.canary_runs import CanaryRun, CanaryRuns

__all__ = ["RouteChoice", "Router", "ArmCounts", "CONTROL", "CANDIDATE", "arm_plans"]

MAX_CHOOSERS = 1024   # models kept per config; more are dropped together and built again
CONTROL, CANDIDATE = "control", "candidate"
ArmCounts = dict[tuple[str, str], int]
"""Requests sent down each arm, by (route pattern, arm): the arm is a provider (split), control or candidate
(canary), or a model (rules), so both labels come from the config."""


class RouteChoice:
    """The plan a request is served by, its arm (None on a plain route) and, on a canary, what to tally."""

    __slots__ = ("plan", "arm", "run", "arm_index", "step")

    def __init__(self, plan: Plan, arm: str | None = None, run: CanaryRun | None = None, arm_index: int = 0,
                 step: int = -1) -> None:
        self.plan, self.arm, self.run, self.arm_index, self.step = plan, arm, run, arm_index, step


class _Chooser(Protocol):
    def choose(self, caller: CallerIdentity, req: ProxyRequest, headers: Mapping[str, str]) -> RouteChoice:
        """The plan (and arm) of one request."""


class _Fixed:
    """A plain route: always its one plan."""

    __slots__ = ("choice",)

    def __init__(self, choice: RouteChoice) -> None:
        self.choice = choice

    def choose(self, caller: CallerIdentity, req: ProxyRequest, headers: Mapping[str, str]) -> RouteChoice:
        """The one plan."""
        return self.choice


class _StickyPoints:
    """Each caller's stable point on one route, hashed once (kept for up to MAX_CHOOSERS callers at a time)."""

    __slots__ = ("route", "_points")

    def __init__(self, route: Route) -> None:
        self.route, self._points = route, dict[str, float]()

    def point(self, caller: CallerIdentity, req: ProxyRequest) -> float:
        """The point of the request's caller (or end user)."""
        who = _who(self.route, caller, req)
        point = self._points.get(who)
        if point is None:
            if len(self._points) >= MAX_CHOOSERS:
                self._points.clear()
            point = self._points[who] = stable_point(self.route.pattern, who)
        return point


def _who(route: Route, caller: CallerIdentity, req: ProxyRequest) -> str:
    """Whom a sticky route keeps on one arm: the key's caller, or the request's end user (else the caller)."""
    if route.sticky == "user":
        user = req.payload.get("user")
        if isinstance(user, str) and user:
            return "user\0" + user
    return "key\0" + caller.name


class _Split:
    """A weighted split: a random point per request, or a stable one per caller when sticky."""

    def __init__(self, route: Route, plans: list[Plan], counts: ArmCounts, rng: random.Random) -> None:
        self.route, self.counts, self.random = route, counts, rng.random
        self.sticky = None if route.sticky == "none" else _StickyPoints(route)
        self.weights = Weights(route.weights)
        self.choices = [RouteChoice(plan, plan.targets[0].provider) for plan in plans]
        self.keys = [(route.pattern, choice.arm or "") for choice in self.choices]

    def choose(self, caller: CallerIdentity, req: ProxyRequest, headers: Mapping[str, str]) -> RouteChoice:
        """The arm the request's point falls on, counted."""
        point = self.random() if self.sticky is None else self.sticky.point(caller, req)
        index = self.weights.arm(point)
        self.counts[self.keys[index]] += 1
        return self.choices[index]


class _Canary:
    """A canary: the candidate's share is its run's cached step; a random or sticky point picks the arm."""

    def __init__(self, route: Route, run: CanaryRun, counts: ArmCounts, rng: random.Random) -> None:
        self.route, self.run, self.counts, self.random = route, run, counts, rng.random
        self.sticky = None if route.sticky == "none" else _StickyPoints(route)
        self.keys = ((route.pattern, CONTROL), (route.pattern, CANDIDATE))

    def choose(self, caller: CallerIdentity, req: ProxyRequest, headers: Mapping[str, str]) -> RouteChoice:
        """The candidate when the request's point is below the step's percent, else the control; counted."""
        run = self.run
        point = self.random() if self.sticky is None else self.sticky.point(caller, req)
        index = 1 if point * 100 < run.percent else 0
        self.counts[self.keys[index]] += 1
        return run.choices[index]


class _Rules:
    """An `auto` route: the first matching rule's model, routed as that model is."""

    def __init__(self, route: Route, router: Router, settings: Settings, counts: ArmCounts) -> None:
        self.route, self.router, self.settings, self.counts = route, router, settings, counts

    def choose(self, caller: CallerIdentity, req: ProxyRequest, headers: Mapping[str, str]) -> RouteChoice:
        """The choice of the first matching rule's model."""
        rule = first_match(self.route.rules, Traits(req, caller, headers))
        key = (self.route.pattern, rule.model)
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.router.chooser(self.settings, rule.model).choose(caller, req, headers)


class Router:
    """Chooses each request's plan; its choosers follow the config (rebuilt when a reload swaps Settings)."""

    def __init__(self, canaries: CanaryRuns, rng: random.Random | None = None) -> None:
        self.canaries = canaries
        self.counts: ArmCounts = {}
        self._rng = rng or random.Random()
        self.plans = PlanCache()
        self.apis = ApiPlans()
        self._settings: Settings | None = None
        self._choosers: dict[str, _Chooser] = {}

    def route(self, settings: Settings, caller: CallerIdentity, req: ProxyRequest,
              headers: Mapping[str, str]) -> RouteChoice:
        """The plan of `req` (NotFound for a model no route serves or prices)."""
        if settings is not self._settings:
            self._settings, self._choosers = settings, {}
        chooser = self._choosers.get(req.model)
        if chooser is None:
            chooser = self.chooser(settings, req.model)
        choice = chooser.choose(caller, req, headers)
        plan = self.apis.serving(settings, choice.plan, req.endpoint)
        if plan is choice.plan:
            return choice
        return RouteChoice(plan, choice.arm, choice.run, choice.arm_index, choice.step)

    def plan_for(self, settings: Settings, model: str, endpoint: Endpoint) -> Plan:
        """The plain plan of `model` (a downgrade's), kept to the providers that serve `endpoint`."""
        return self.apis.serving(settings, self.plans.plan_for(settings, model), endpoint)

    def fixed(self, settings: Settings, model: str) -> bool:
        """Whether every request for `model` gets the same plan (a plain route: no split, canary or rules)."""
        return isinstance(self.chooser(settings, model), _Fixed)

    def chooser(self, settings: Settings, model: str) -> _Chooser:
        """The chooser of `model` under `settings`, built on first use."""
        if settings is not self._settings:
            self._settings, self._choosers = settings, {}
        chooser = self._choosers.get(model)
        if chooser is None:
            if len(self._choosers) >= MAX_CHOOSERS:
                self._choosers = {}
            chooser = self._choosers[model] = self._build(settings, model)
        return chooser

    def _build(self, settings: Settings, model: str) -> _Chooser:
        route = settings.route_for(model)
        if route is None or route.plain:
            return _Fixed(RouteChoice(self.plans.plan_for(settings, model)))
        if route.rules:
            return _Rules(route, self, settings, self.counts)
        plans = arm_plans(settings, model)
        for arm in ((p.targets[0].provider for p in plans) if route.canary is None else (CONTROL, CANDIDATE)):
            self.counts.setdefault((route.pattern, arm), 0)
        if route.canary is None:
            return _Split(route, plans, self.counts, self._rng)
        return _Canary(route, self.canaries.run_for(route, plans), self.counts, self._rng)


def _arm_first(plan: Plan, index: int) -> Plan:
    """`plan` with target `index` first and the others after it, in order."""
    targets = plan.targets
    return Plan(plan.model, plan.route, (targets[index], *targets[:index], *targets[index + 1:]))



def arm_plans(settings: Settings, model: str) -> list[Plan]:
    """One plan per target of `model`'s route, that target first (NotFound when a target has no price)."""
    plan = plan_for(settings, model)
    return [_arm_first(plan, index) for index in range(len(plan.targets))]
