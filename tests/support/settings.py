"""Building gateway Settings for tests without YAML (the loader has its own tests)."""

from __future__ import annotations

import dataclasses
from decimal import Decimal
from typing import Any

from gateway.config.model import (
    ApiKey, BudgetLimit, CallerIdentity, Policy, PolicyMatch, ModelPrice, ProviderConfig, ProviderTimeouts, Route, RouteTarget,
    ServerConfig, Settings, StoreConfig,
)
from gateway.http.auth import key_digest
from tests.support.canary import CANARY_KEY

__all__ = ["CLIENT_KEY", "OTHER_KEY", "ADMIN_KEY", "PRICES", "make_settings", "make_policy"]

CLIENT_KEY = "sk-client-web-0001"
OTHER_KEY = "sk-client-data-0002"
ADMIN_KEY = "sk-admin-0003"
PRICES = {
    "gpt-4.1": ModelPrice(Decimal("2.00"), Decimal("8.00"), Decimal("0.50"), max_output_tokens=1000),
    "gpt-4o-mini": ModelPrice(Decimal("0.15"), Decimal("0.60"), Decimal("0.075"), max_output_tokens=1000),
    "deepseek-v3.2": ModelPrice(Decimal("0.14"), Decimal("0.42"), max_output_tokens=1000),
    "text-embedding-3-small": ModelPrice(Decimal("0.02"), Decimal("0")),
}


def make_settings(upstreams: dict[str, str], *, routes: dict[str, list[Any]] | None = None,
                  max_body_bytes: int = 1 << 20, store: StoreConfig | None = None,
                  read_timeout_s: float = 5.0, **overrides: Any) -> Settings:
    """Settings with one provider per upstream URL (all using the canary key) and two client keys.

    Spare reservations are off unless `store` turns them on: these tests count reservations exactly and
    move a fake clock past leases (tests/test_spare_reservations.py covers spares).
    """
    providers = {
        name: ProviderConfig(name=name, base_url=url, api_key=CANARY_KEY,
                             timeouts=ProviderTimeouts(connect_s=2, read_s=read_timeout_s, total_s=30))
        for name, url in upstreams.items()
    }
    names = list(upstreams)
    routes = routes or {model: names for model in PRICES}
    route_list = tuple(
        Route(pattern, tuple(RouteTarget(t) if isinstance(t, str) else RouteTarget(*t) for t in targets))
        for pattern, targets in routes.items()
    )
    keys = (
        ApiKey(key_digest(CLIENT_KEY), CallerIdentity("web-app", team="web", tags=("prod",))),
        ApiKey(key_digest(OTHER_KEY), CallerIdentity("batch", team="data")),
    )
    settings = Settings(
        server=ServerConfig(max_body_bytes=max_body_bytes, admin_key_sha256=key_digest(ADMIN_KEY)),
        store=store or StoreConfig(reserve_ahead=False),
        providers=providers, routes=route_list, pricing=dict(PRICES), keys=keys,
    )
    return dataclasses.replace(settings, **overrides)


def make_policy(name: str, *, period: str = "daily", usd: str | None = None, tokens: int | None = None,
                requests: int | None = None, timezone: str = "UTC", downgrade_to: str | None = None,
                **match: Any) -> Policy:
    """A one-budget policy; `match` takes keys=, teams=, tags=, models= as tuples."""
    limit = BudgetLimit(period=period, usd=None if usd is None else Decimal(usd), tokens=tokens,
                        requests=requests)
    return Policy(name=name, match=PolicyMatch(**match), budgets=(limit,), timezone=timezone,
                  on_exceed="downgrade" if downgrade_to else "block", downgrade_to=downgrade_to)
