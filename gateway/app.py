"""Building the aiohttp application: every shared object and lifetime wired in one place."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from gateway.access_log import AccessLog
from gateway.appkeys import ACCESS_LOG, BUDGET, CLOCK, CONFIG, PROVIDERS
from gateway.budget.engine import BudgetEngine
from gateway.clock import Clock, SystemClock
from gateway.config.holder import ConfigHolder
from gateway.config.model import Settings
from gateway.info import add_info_routes
from gateway.middleware import error_middleware
from gateway.proxy.handler import add_proxy_routes
from gateway.proxy.providers import ProviderPool

__all__ = ["create_app"]


def create_app(settings: Settings, *, config_path: str | None = None, clock: Clock | None = None,
               budget: BudgetEngine | None = None, access_log: AccessLog | None = None) -> web.Application:
    """The gateway application; tests pass fakes, production passes nothing."""
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.server.max_body_bytes)
    app[CONFIG] = ConfigHolder(settings, config_path)
    app[CLOCK] = clock or SystemClock()
    app[BUDGET] = budget or BudgetEngine()
    app[ACCESS_LOG] = access_log or AccessLog(settings.server.access_log)
    app.cleanup_ctx.append(provider_pool)
    add_proxy_routes(app)
    add_info_routes(app)
    return app


async def provider_pool(app: web.Application) -> AsyncIterator[None]:
    """One pooled ClientSession per provider for the app's lifetime."""
    app[PROVIDERS] = ProviderPool(app[CONFIG].current.providers)
    yield
    await app[PROVIDERS].close()
