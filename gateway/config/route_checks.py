"""Where each target of a route is written, and the rules of an `auto` route checked against the others.

A rule's model must be priced (it is what the request reserves and is charged) and served by a route that
is not itself a rules route (rules pick a model once; they do not chain).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.config.document import Doc
from gateway.config.globs import is_glob
from gateway.config.interpolate import Loc
from gateway.config.routes import Route, RouteTarget

__all__ = ["target_locs", "check_rules", "check_canary"]


def target_locs(raw: Any, loc: Loc, route: Route) -> list[tuple[Loc, RouteTarget]]:
    """Each target of `route` with where its provider name is written (`raw` is the route as written)."""
    if isinstance(raw, list):
        return [(_provider_loc(raw[index], (*loc, index)), target) for index, target in enumerate(route.targets)]
    if route.weights:
        return [((*loc, "split", index, "provider"), target) for index, target in enumerate(route.targets)]
    if route.canary is not None:
        canary = raw["canary"]
        return [(_provider_loc(canary[arm], (*loc, "canary", arm)), target)
                for arm, target in zip(("control", "candidate"), route.targets)]
    return []


def _provider_loc(written: Any, loc: Loc) -> Loc:
    """Where a target's provider name is written: the item itself, or its `provider` key."""
    return (*loc, "provider") if isinstance(written, dict) else loc


def check_rules(doc: Doc, loc: Loc, route: Route, routes: Sequence[Route], prices: frozenset[str] | None) -> None:
    """Report rule models that are not priced, not routed, or routed to another rules route."""
    for index, rule in enumerate(route.rules):
        at = (*loc, "rules", index, "model")
        model = doc.quoted(at, rule.model)
        serving = _route_for(routes, rule.model)
        if prices is not None and rule.model not in prices:
            doc.report(at, f"model {model} has no price: a rule's model is what the request is charged")
        elif serving is None:
            doc.report(at, f"no route serves model {model}")
        elif serving.rules:
            doc.report(at, f"model {model} is routed by rules too: a rule must name a model served by providers")


def _route_for(routes: Sequence[Route], model: str) -> Route | None:
    """The route serving `model`, as `Settings.route_for` finds it."""
    exact = next((route for route in routes if route.pattern == model), None)
    return exact or next((route for route in routes if route.matches(model)), None)


def check_canary(doc: Doc, loc: Loc, route: Route) -> None:
    """A canary moves one model's traffic: its route names a model, not a glob."""
    if route.canary is not None and is_glob(route.pattern):
        doc.report(loc, "a canary route must name one model, not a glob")
