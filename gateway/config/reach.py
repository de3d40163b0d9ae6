"""What a policy can name: the callers, teams and tags the keys give, the models the routes serve and price.

A `match` naming anything else can never match, which silently switches its budget off, so the loader
reports it (with a "did you mean ...?" when a known name is close). A section that did not validate
leaves its names unknown: nothing is reported against it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from gateway.config.globs import globs_overlap, is_glob
from gateway.config.model import ADMIN_CALLER, LOCAL_CALLER, ApiKey, CallerIdentity, Route, ServerConfig
from gateway.config.suggest import did_you_mean

__all__ = ["Reach", "Prices"]

Prices = frozenset[str] | None   # the priced model names; None: the prices could not be read

_SEPARATORS = frozenset("-._")
_UNKNOWN = {"keys": "no key is named", "teams": "no key has team", "tags": "no key has tag"}
_NEVER = ", so the policy can never match"


@dataclass(frozen=True)
class Reach:
    """The names a policy can use, from the validated server, keys, routes and prices (None: not known)."""

    callers: frozenset[str] | None
    teams: frozenset[str] | None
    tags: frozenset[str] | None
    routes: tuple[Route, ...] | None
    prices: Prices

    @classmethod
    def of(cls, server: ServerConfig | None, keys: Sequence[ApiKey] | None, routes: tuple[Route, ...] | None,
           prices: Prices) -> Reach:
        """What the config's server, keys, routes and prices let a policy name."""
        if keys is None:
            return cls(None, None, None, routes, prices)
        identities = [key.identity for key in keys]
        return cls(
            callers=None if server is None else frozenset(_callers(server, identities)),
            teams=frozenset(identity.team for identity in identities if identity.team),
            tags=frozenset(tag for identity in identities for tag in identity.tags),
            routes=routes,
            prices=prices,
        )

    def miss(self, field: str, name: str, shown: str) -> str | None:
        """Why `name` under match.`field` can never match (naming it `shown`), with a suggestion; None if it can."""
        if field == "models":
            if self.routes is None or self.serves_some(name):
                return None
            return f"no route serves a model matching {shown}{_NEVER}" + did_you_mean(name, self._model_names(name))
        known = {"keys": self.callers, "teams": self.teams, "tags": self.tags}[field]
        if known is None or name in known:
            return None
        return f"{_UNKNOWN[field]} {shown}{_NEVER}" + did_you_mean(name, known)

    def suggest_model(self, glob: str) -> str:
        """"; did you mean ...?" with the served model names or globs closest to `glob` (empty when none is)."""
        return did_you_mean(glob, self._model_names(glob))

    def serves_some(self, glob: str) -> bool:
        """True when some model a client can be served matches `glob`."""
        return (any(fnmatch.fnmatchcase(model, glob) for model in self._served)
                or any(globs_overlap(glob, route.pattern) for route in self._glob_routes if self._prices_all(route)))

    @cached_property
    def _served(self) -> frozenset[str]:
        """Exact route names (not a rules route's: its request is charged as the model a rule picks), and the
        priced models that a glob route serves."""
        names = {route.pattern for route in self.routes or () if not is_glob(route.pattern) and not route.rules}
        priced = (model for model in self.prices or () if any(r.matches(model) for r in self._glob_routes))
        return frozenset(names.union(priced))

    @cached_property
    def _glob_routes(self) -> tuple[Route, ...]:
        """The routes whose pattern is a glob."""
        return tuple(route for route in self.routes or () if is_glob(route.pattern))

    def _prices_all(self, route: Route) -> bool:
        """True when the route prices any name it matches: a target renames it to a priced model (or no prices read)."""
        renamed = (target.upstream_model for target in route.targets if target.upstream_model)
        return self.prices is None or any(model in self.prices for model in renamed)

    def _model_names(self, glob: str) -> set[str]:
        """Served names and glob routes that serve some; for a glob, also globs of served names' parts (`gpt-4*`)."""
        names = {*self._served, *(route.pattern for route in self._glob_routes if self.serves_some(route.pattern))}
        if is_glob(glob):
            names |= {model[:end] + "*" for model in self._served for end in _part_ends(model)}
        return names


def _callers(server: ServerConfig, identities: Sequence[CallerIdentity]) -> set[str]:
    """The caller names requests can carry: each key's, the admin's when set, `local` under `auth: none`."""
    callers = {identity.name for identity in identities if identity.name}
    callers |= {ADMIN_CALLER.name} if server.admin_key_sha256 else set()
    return callers | ({LOCAL_CALLER.name} if server.auth == "none" else set())   # a request without a known key


def _part_ends(model: str) -> set[int]:
    """Where a part of a model name ends: on either side of each `-`, `.` or `_` inside it."""
    return {end for index, char in enumerate(model) if char in _SEPARATORS for end in (index, index + 1)} - {0}
