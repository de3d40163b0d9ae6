"""Building the aiohttp application: every shared object and lifetime wired in one place."""

from __future__ import annotations

import asyncio
import logging
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.access_log import AccessLog
from gateway.appkeys import (
    ACCESS_LOG, BACKGROUND, BUDGET, CLOCK, CONFIG, METRICS, OPEN_STREAMS, PEERS, PROVIDERS, RELOADER,
    RESILIENCE,
)
from gateway.background import BackgroundFailures, keep_running
from gateway.budget.alerts import add_budget_alerts
from gateway.budget.factory import create_engine
from gateway.budget.rate_status import add_rate_status_routes
from gateway.budget.status import add_budget_status_routes
from gateway.budget.store import BudgetStore
from gateway.budget.usage import add_budget_usage_routes
from gateway.clock import Clock, SystemClock
from gateway.config.holder import ConfigHolder
from gateway.config.model import Settings
from gateway.config.reload import ConfigReloader
from gateway.info import add_info_routes
from gateway.log_scrub import scrub_logs
from gateway.metrics import GatewayMetrics, add_metrics_routes
from gateway.middleware import request_middleware
from gateway.peers import Peers
from gateway.proxy.handler import add_proxy_routes
from gateway.proxy.open_streams import OpenStreams
from gateway.proxy.provider_status import add_provider_status_routes
from gateway.proxy.providers import ProviderPool
from gateway.resilience.registry import ResilienceRegistry

__all__ = ["create_app"]

log = logging.getLogger("gateway")

RECOVERY_INTERVAL_S = 1.0


def create_app(settings: Settings, *, config_path: str | None = None, clock: Clock | None = None,
               store: BudgetStore | None = None, access_log: AccessLog | None = None,
               sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
               registry: CollectorRegistry | None = None, peers: Peers | None = None) -> web.Application:
    """The gateway application; tests pass fakes, production passes nothing (a fresh metrics registry).

    `peers`: this worker's siblings under `gateway run --workers N` (metrics and status answer for all).
    """
    scrub_logs()
    app = web.Application(client_max_size=settings.server.max_body_bytes)
    app[CONFIG] = ConfigHolder(settings, config_path)
    app[CLOCK] = clock = clock or SystemClock()
    app[BACKGROUND] = BackgroundFailures()
    app[METRICS] = metrics = GatewayMetrics(registry or CollectorRegistry(), app[CONFIG])
    app[BUDGET] = create_engine(settings.store, clock, store, observe=metrics.store_operation)
    app[ACCESS_LOG] = access_log = access_log or AccessLog(settings.server.access_log)
    app.middlewares.append(request_middleware(metrics, access_log))
    app[RESILIENCE] = ResilienceRegistry(settings, clock, sleep=sleep)
    app[OPEN_STREAMS] = OpenStreams()
    metrics.follow(app[RESILIENCE])
    if peers is not None:
        app[PEERS] = peers
        app.cleanup_ctx.append(peers.link)
    app.cleanup_ctx.append(provider_pool)
    app.cleanup_ctx.append(budget_recovery)
    add_budget_alerts(app, sleep=sleep)
    if config_path is not None:
        app.cleanup_ctx.append(config_reload)
    add_proxy_routes(app)
    add_info_routes(app)
    add_provider_status_routes(app)
    add_budget_status_routes(app)
    add_rate_status_routes(app)
    add_budget_usage_routes(app)
    add_metrics_routes(app)
    return app


async def provider_pool(app: web.Application) -> AsyncIterator[None]:
    """One pooled ClientSession per provider for the app's lifetime; their secrets stay out of every log."""
    app[PROVIDERS] = pool = ProviderPool(app[CONFIG].current.providers)
    unfollow = scrub_logs().follow(lambda: pool.redactor)
    yield
    await pool.close()
    unfollow()


async def budget_recovery(app: web.Application) -> AsyncIterator[None]:
    """Replay journaled spend at start and whenever the store comes back; close the store at the end."""
    engine = app[BUDGET]

    async def step() -> None:
        await engine.recover()
        await asyncio.sleep(RECOVERY_INTERVAL_S)

    task = asyncio.create_task(keep_running("journal_replay", step, app[BACKGROUND]))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await engine.close()


async def config_reload(app: web.Application) -> AsyncIterator[None]:
    """Watch the config files and apply valid edits to every component that follows the config.

    The watcher survives any exception (a full file descriptor table, a bug in a callback): it is logged,
    counted and the next poll goes on.
    """
    holder = app[CONFIG]
    assert holder.path is not None
    app[RELOADER] = reloader = ConfigReloader(holder, holder.path, on_change=[
        lambda fresh: app[PROVIDERS].sync(fresh.providers),
        app[RESILIENCE].sync,
    ])
    task = asyncio.create_task(keep_running("config_reload", reloader.poll, app[BACKGROUND]))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
