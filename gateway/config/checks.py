"""Rules across sections and files: routes name known providers once each and are priced, keys are unique,
policies can match something, downgrade to a priced and routed model, and have unique names; cached model
globs can match something.

They look at what validated: a section with a mistake (already reported) is not checked against, so one
mistake is reported once. Provider and model names come from the files themselves, so a provider whose
`base_url` is wrong is still a known provider.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from gateway.config.document import Doc
from gateway.config.globs import is_glob
from gateway.config.interpolate import Loc
from gateway.config.issues import render
from gateway.config.model import ApiKey, CacheConfig, Policy, Route, ServerConfig
from gateway.config.reach import Prices, Reach
from gateway.config.route_checks import check_canary, check_rules, target_locs

__all__ = ["Loaded", "PolicyAt", "check"]

H = TypeVar("H", bound=Hashable)


@dataclass(frozen=True)
class PolicyAt:
    """A validated policy, the file it came from and where in it."""

    doc: Doc
    loc: Loc
    policy: Policy


@dataclass(frozen=True)
class Loaded:
    """What the cross rules look at; None where a section did not validate (or a file could not be read)."""

    config: Doc
    server: ServerConfig | None
    keys: tuple[ApiKey, ...] | None
    routes: tuple[Route, ...] | None
    providers: frozenset[str] | None
    prices: Prices
    policies: Sequence[PolicyAt]
    cache: CacheConfig | None = None


def check(loaded: Loaded) -> None:
    """Report every cross-reference problem."""
    if loaded.routes is not None:
        for route in loaded.routes:
            _check_route(loaded, route)
    if loaded.keys is not None:
        _check_keys(loaded.config, loaded.keys)
    reach = Reach.of(loaded.server, loaded.keys, loaded.routes, loaded.prices)
    for at in loaded.policies:
        _check_policy(at, reach)
    _check_policy_names(loaded.policies)
    if loaded.cache is not None:
        _check_cache(loaded.config, loaded.cache, reach)


def _check_route(loaded: Loaded, route: Route) -> None:
    """Known providers, each once; every target of a plain model name priced; rules name served models.

    A glob's targets are priced per model at request time: one that cannot be is refused there (404).
    """
    doc, loc = loaded.config, ("routes", route.pattern)
    named = target_locs(doc.data["routes"][route.pattern], loc, route)
    if route.rules:
        check_rules(doc, loc, route, loaded.routes or (), loaded.prices)
    check_canary(doc, loc, route)
    known = []
    for at, target in named:
        if loaded.providers is None or target.provider in loaded.providers:
            known.append((at, target))
        else:
            doc.report(at[:-1] if at[-1] == "provider" else at, f"unknown provider {doc.quoted(at, target.provider)}")
    if loaded.prices is not None and not is_glob(route.pattern) and not route.rules:
        _check_priced(doc, loc, route.pattern, [target for _, target in known], loaded.prices)
    for at, provider, first in _repeats((at, target.provider) for at, target in known):
        doc.report(at, f"provider {doc.quoted(at, provider)} is already listed at {render(first)}")


def _check_priced(doc: Doc, loc: Loc, model: str, targets: Sequence[Any], prices: frozenset[str]) -> None:
    """Report targets without a price by the pricing rule (`prices.target_price`): their model's, else `model`'s."""
    if model in prices:
        return                               # every target falls back on the client model's price
    unpriced = [target.provider for target in targets if target.upstream_model not in prices]
    if len(unpriced) == len(targets):
        doc.report(loc, f"model '{model}' has no price")
        return
    for provider in unpriced:
        doc.report(loc, f"model '{model}' has no price for provider '{provider}': every target of a route needs one "
                        "(its upstream model's, else the client model's)")


def _check_keys(doc: Doc, keys: Sequence[ApiKey]) -> None:
    """Names and keys unique."""
    named = ((("keys", index, "name"), key.identity.name) for index, key in enumerate(keys))
    for at, name, first in _repeats(named):
        doc.report(at, f"duplicate key name {doc.quoted(at, name)} (also at {render(first)})")
    digests = ((("keys", index), key.sha256) for index, key in enumerate(keys))
    for at, _, first in _repeats(digests):
        doc.report(at, f"same key as {render(first)}")


def _check_policy(at: PolicyAt, reach: Reach) -> None:
    """Every name under `match` can match; a downgrade model is priced and routed."""
    match = at.policy.match
    for field, names in (("keys", match.keys), ("teams", match.teams), ("tags", match.tags),
                         ("models", match.models)):
        for index, name in enumerate(names):
            loc = (*at.loc, "match", field, index)
            miss = reach.miss(field, name, at.doc.quoted(loc, name))
            if miss is not None:
                at.doc.report(loc, miss)
    model = at.policy.downgrade_to
    if model is not None:
        loc = (*at.loc, "on_exceed", "downgrade")
        if reach.prices is not None and model not in reach.prices:
            at.doc.report(loc, f"model {at.doc.quoted(loc, model)} has no price")
        elif reach.routes is not None and not any(route.matches(model) for route in reach.routes):
            at.doc.report(loc, f"no route serves model {at.doc.quoted(loc, model)}")


def _check_cache(doc: Doc, cache: CacheConfig, reach: Reach) -> None:
    """Every glob under cache.models can match a model that is served."""
    for index, glob in enumerate(cache.models):
        loc = ("cache", "models", index)
        if reach.routes is not None and not reach.serves_some(glob):
            doc.report(loc, f"no route serves a model matching {doc.quoted(loc, glob)}, so nothing is cached by it"
                            + reach.suggest_model(glob))


def _check_policy_names(policies: Sequence[PolicyAt]) -> None:
    """Report every policy whose name an earlier one (in any file) already has."""
    for at, name, first in _repeats((at, at.policy.name) for at in policies):
        loc = (*at.loc, "name")
        also = f"{first.doc.file} at {render(first.loc)}" if first.loc else first.doc.file
        at.doc.report(loc, f"duplicate policy name {at.doc.quoted(loc, name)} (also in {also})")


def _repeats(items: Iterable[tuple[Any, H]]) -> Iterator[tuple[Any, H, Any]]:
    """Each (where, value, where first) whose value an earlier item already had."""
    first: dict[H, Any] = {}
    for where, value in items:
        if value in first:
            yield where, value, first[value]
        else:
            first[value] = where
