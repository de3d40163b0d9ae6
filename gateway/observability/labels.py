"""Label values bounded by the config: only configured names become labels, anything else is `other`.

A value the request never got (refused before routing, no provider called) is `none`. No key, key
digest, caller name, request id or path is ever a label.
"""

from __future__ import annotations

from gateway.config.model import Settings

__all__ = ["NONE", "OTHER", "LabelBounds", "status_class"]

NONE = "none"
OTHER = "other"


def status_class(status: int) -> str:
    """`2xx`, `4xx`, `5xx` (or another hundred) for an HTTP status."""
    return f"{status // 100}xx"


class LabelBounds:
    """The label values one Settings allows for models, routes, providers and policies."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._routes = frozenset(route.pattern for route in settings.routes)
        self._models = frozenset(settings.pricing) | self._routes
        self._providers = frozenset(settings.providers)
        self._policies = frozenset(policy.name for policy in settings.policies)

    def model(self, name: str | None) -> str:
        """A priced model or route pattern; else `other`."""
        return _bounded(name, self._models)

    def route(self, pattern: str | None) -> str:
        """A configured route pattern; else `other`."""
        return _bounded(pattern, self._routes)

    def provider(self, name: str | None) -> str:
        """A configured provider; else `other`."""
        return _bounded(name, self._providers)

    def policy(self, name: str | None) -> str:
        """A configured policy; else `other`."""
        return _bounded(name, self._policies)


def _bounded(value: str | None, allowed: frozenset[str]) -> str:
    """`value` when allowed, `none` when missing, else `other`."""
    if value is None:
        return NONE
    return value if value in allowed else OTHER
