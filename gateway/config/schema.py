"""The shape of every config file: which keys exist and what kind of value each holds (pass one)."""

from __future__ import annotations

from gateway.config.shape import SCALAR, Either, IfKey, Keys, ListOf, MapOf, Shape

__all__ = ["CONFIG_FILE", "PRICING_FILE", "POLICY_FILE"]


def _scalars(*names: str, **shapes: Shape) -> Keys:
    """A mapping whose `names` hold single values and whose `shapes` keys hold the given shapes."""
    return Keys({**{name: SCALAR for name in names}, **shapes})


_SERVER = _scalars(
    "host", "port", "max_body_bytes", "client_timeout_s", "header_timeout_s", "keepalive_timeout_s",
    "max_connections", "shutdown_grace_s", "auth", "admin_key", "admin_key_sha256",
    "access_log", "metrics_key", "metrics_key_sha256",
)
_STORE = _scalars(
    "url", "path", "timeout_s", "pool_size", "on_outage", "fail_open_allowance", "lease_s", "journal_path",
    "ledger_max_entries", "reserve_ahead", "reserve_ahead_idle_s",
)
_PROVIDER = _scalars(
    "base_url", "api_key", "max_connections", "max_response_bytes",
    headers=MapOf(SCALAR),
    timeouts=_scalars("connect_s", "read_s", "total_s", "stream_s"),
)
_ROUTE_TARGET = Either((SCALAR, _scalars("provider", "model")), "a provider name or a mapping {provider, model}")
_MODEL_PRICE = _scalars("input", "output", "cached_input", "max_output_tokens")
_MODEL_PRICES = MapOf(_MODEL_PRICE)
_KEY = _scalars("name", "team", "sha256", "key_env", "admin", tags=ListOf(SCALAR))
_RETRY = _scalars(
    "max_retries", "backoff_base_s", "backoff_cap_s", "retry_after_cap_s", "deadline_s", "budget_ratio",
    "budget_floor", statuses=ListOf(SCALAR),
)
_BREAKER = _scalars(
    "window_s", "min_calls", "failure_rate", "consecutive_failures", "open_s", "open_max_s",
    "half_open_probes",
)

CONFIG_FILE = Keys({
    "server": _SERVER,
    "store": _STORE,
    "providers": MapOf(_PROVIDER),
    "routes": MapOf(ListOf(_ROUTE_TARGET)),
    "pricing": Either((SCALAR, _MODEL_PRICES), "a file path or a mapping of model prices"),
    "keys": ListOf(_KEY),
    "policies": Either((SCALAR, ListOf(SCALAR)), "a directory or a list of files"),
    "retry": _RETRY,
    "breaker": _BREAKER,
})

PRICING_FILE = Keys({"models": _MODEL_PRICES})

_BUDGET = _scalars("period", "usd", "tokens", "requests")
_POLICY = _scalars(
    "name", "timezone", "max_output_tokens",
    match=Keys({field: ListOf(SCALAR) for field in ("keys", "teams", "tags", "models")}),
    budgets=ListOf(_BUDGET),
    warn_at=ListOf(SCALAR),
    on_exceed=Either((SCALAR, _scalars("downgrade")), "'block' or a mapping {downgrade: <model>}"),
    alerts=_scalars("webhook", "format"),
)
POLICY_FILE = IfKey("policies", Keys({"policies": ListOf(_POLICY)}), _POLICY)
