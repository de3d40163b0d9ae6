"""Human summaries of loaded Settings for `gateway check` and the startup log; never a secret or a userinfo."""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from gateway.config.hosts import is_loopback
from gateway.config.model import Route, RouteTarget, Settings

__all__ = ["summarize", "startup_line"]


def summarize(settings: Settings) -> str:
    """A few lines describing what the config sets up."""
    server = settings.server
    lines = [
        f"server: {server.host}:{server.port}, auth: {_auth(settings)}, /metrics: {_metrics(settings)}",
        f"store: {_store(settings, detail=True)}",
        "providers: " + ", ".join(f"{p.name} ({_url_host(p.base_url)})" for p in settings.providers.values()),
        f"routes: {len(settings.routes)}",
        *(f"  {route.pattern} -> {_route(route)}" for route in settings.routes),
        f"pricing: {len(settings.pricing)} models",
        f"keys: {len(settings.keys)}",
        f"policies: {len(settings.policies)}" + _names(policy.name for policy in settings.policies),
    ]
    return "\n".join(lines)


def startup_line(settings: Settings) -> str:
    """One log line: providers, routes, store, keys, policies, auth, who may read /metrics."""
    return "; ".join([
        "providers: " + ", ".join(settings.providers),
        f"routes: {len(settings.routes)}",
        f"store: {_store(settings, detail=False)}",
        f"keys: {len(settings.keys)}",
        f"policies: {len(settings.policies)}",
        f"auth: {_auth(settings)}",
        f"/metrics: {_metrics(settings)}",
    ])


def _auth(settings: Settings) -> str:
    """The auth mode, flagged when there is none."""
    return "none (loopback only)" if settings.server.auth == "none" else "keys"


def _metrics(settings: Settings) -> str:
    """Who may read /metrics: said out loud when anyone who reaches the host may."""
    server = settings.server
    if server.metrics_key_sha256:
        return "needs metrics_key"
    return "loopback only" if is_loopback(server.host) else "public (no metrics_key set)"


def _store(settings: Settings, *, detail: bool) -> str:
    """`redis (hosts)` or `embedded`, with the SQLite path when `detail`."""
    store = settings.store
    if store.url:
        return f"redis ({_redis_hosts(store.url)})"
    return f"embedded (SQLite {store.path})" if detail else "embedded"


def _redis_hosts(url: str) -> str:
    """The host[:port] list of a Redis URL, without its userinfo, database or query."""
    netloc = urlsplit(url).netloc
    if "@" not in netloc and "@" in url.partition("://")[2]:
        return "host hidden"  # a password with an unencoded / ? or # cut the netloc short
    return netloc.rpartition("@")[2]


def _url_host(url: str) -> str:
    """host[:port] of an http(s) URL, without its userinfo."""
    return urlsplit(url).netloc.rpartition("@")[2]


def _route(route: Route) -> str:
    """How a route serves: its providers in order, or its split, canary or rules."""
    if route.rules:
        return "rules: " + ", ".join(rule.model for rule in route.rules)
    if route.canary is not None:
        canary = route.canary
        steps = "/".join(map(str, canary.steps))
        return f"canary {_target(canary.control)} -> {_target(canary.candidate)} in steps {steps}%"
    if route.weights:
        arms = ", ".join(f"{_target(target)} {weight}" for target, weight in zip(route.targets, route.weights))
        return f"split {arms}" + (f" (sticky {route.sticky})" if route.sticky != "none" else "")
    return ", ".join(map(_target, route.targets))


def _target(target: RouteTarget) -> str:
    """A route target as `provider` or `provider as upstream-model`."""
    return f"{target.provider} as {target.upstream_model}" if target.upstream_model else target.provider


def _names(names: Iterable[str]) -> str:
    """` (a, b, c)`, or nothing when there are no names."""
    joined = ", ".join(names)
    return f" ({joined})" if joined else ""
