"""Which policies apply to a request: its key's, its team's, its tags', its model's and the global ones."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from gateway.config.model import CallerIdentity, Policy

__all__ = ["applies_to_caller", "matching_policies"]


def applies_to_caller(policy: Policy, caller: CallerIdentity) -> bool:
    """True when every caller field of the policy's match (keys, teams, tags) fits `caller`."""
    match = policy.match
    if match.keys and caller.name not in match.keys:
        return False
    if match.teams and caller.team not in match.teams:
        return False
    return not match.tags or any(tag in match.tags for tag in caller.tags)


def matches_model(policy: Policy, model: str) -> bool:
    """True when the policy has no model globs or one of them matches `model`."""
    return not policy.match.models or any(fnmatch.fnmatchcase(model, glob) for glob in policy.match.models)


def matching_policies(policies: Iterable[Policy], caller: CallerIdentity, model: str) -> list[Policy]:
    """The policies a request by `caller` for `model` must fit, all of them."""
    return [p for p in policies if applies_to_caller(p, caller) and matches_model(p, model)]
