"""The `each` values a status report shows: a caller's own, or (to the admin) every one the config names."""

from __future__ import annotations

from gateway.budget.matching import applies_to_caller, matches_model
from gateway.budget.rate_slots import each_value
from gateway.config.model import CallerIdentity, Policy, Settings

__all__ = ["each_values"]


def each_values(settings: Settings, policy: Policy, caller: CallerIdentity, user: str | None = None
                ) -> list[str | None]:
    """The `each` values of `policy` that `caller` may see: its own, or (admin) every one the config names;
    of an `each: user` policy, the end user asked for (`?user=`), if any: end users are not in the config."""
    if policy.each is None:
        return [None]
    if policy.each == "user":
        return [] if user is None else [user]
    if not caller.admin:
        return [each_value(policy, caller, "")] if policy.each != "model" else _models(settings, policy)
    identities = [key.identity for key in settings.keys if applies_to_caller(policy, key.identity)]
    if policy.each == "key":
        return [*sorted({identity.name for identity in identities})]
    if policy.each == "team":
        return [*sorted({identity.team or "" for identity in identities})]
    return _models(settings, policy)


def _models(settings: Settings, policy: Policy) -> list[str | None]:
    """Routed models named exactly (not globs) that the policy matches."""
    return [*sorted({route.pattern for route in settings.routes if not any(c in route.pattern for c in "*?[")
                     and matches_model(policy, route.pattern)})]
