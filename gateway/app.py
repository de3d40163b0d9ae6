"""Building the aiohttp application: every shared object and lifetime wired in one place."""

from __future__ import annotations

import asyncio
import random
import logging
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.background import BackgroundFailures, keep_running
from gateway.budget.alerts import POST_TIMEOUT_S, AlertSender
from gateway.budget.forecast_alerts import CHECK_S, ForecastAlerts
from gateway.budget.factory import create_engine
from gateway.budget.store import BudgetStore
from gateway.cache.factory import create_cache
from gateway.cache.store import CacheStore
from gateway.clock import Clock, SystemClock
from gateway.config.holder import ConfigHolder
from gateway.config.model import Settings
from gateway.config.reload import ConfigReloader
from gateway.http.appkeys import (
    ACCESS_LOG, ALERTS, BACKGROUND, BUDGET, FORECASTS, CACHE, CLOCK, CONFIG, METRICS, OPEN_STREAMS, PEERS, PROVIDERS,
    RELOADER, RESILIENCE, ROUTER,
)
from gateway.http.budget import add_budget_routes
from gateway.http.info import add_info_routes
from gateway.http.metrics import add_metrics_routes
from gateway.http.middleware import request_middleware
from gateway.http.provider_status import add_provider_status_routes
from gateway.http.rate_limits import add_rate_limit_routes
from gateway.http.ui import add_ui_routes
from gateway.http.proxy import add_proxy_routes
from gateway.log_scrub import scrub_logs
from gateway.observability.access_log import AccessLog
from gateway.observability.canaries import ArmCollector
from gateway.observability.instruments import GatewayMetrics
from gateway.peers import Peers
from gateway.resilience.registry import ResilienceRegistry
from gateway.routing import canary_runs
from gateway.routing.canary_alerts import announce_rollbacks
from gateway.routing.canary_runs import CanaryRuns
from gateway.routing.router import Router
from gateway.upstream.open_streams import OpenStreams
from gateway.upstream.providers import ProviderPool

__all__ = ["create_app"]

log = logging.getLogger("gateway")

RECOVERY_INTERVAL_S = 1.0


def create_app(settings: Settings, *, config_path: str | None = None, clock: Clock | None = None,
               store: BudgetStore | None = None, access_log: AccessLog | None = None,
               sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
               registry: CollectorRegistry | None = None, peers: Peers | None = None,
               cache_store: CacheStore | None = None, rng: random.Random | None = None) -> web.Application:
    """The gateway application; tests pass fakes, production passes nothing (a fresh metrics registry).

    `peers`: this worker's siblings under `gateway run --workers N` (metrics and status answer for all);
    `rng`: what splits and canaries draw their arms from.
    """
    scrub_logs()
    app = web.Application(client_max_size=settings.server.max_body_bytes)
    app[CONFIG] = ConfigHolder(settings, config_path)
    app[CLOCK] = clock = clock or SystemClock()
    app[BACKGROUND] = BackgroundFailures()
    app[METRICS] = metrics = GatewayMetrics(registry or CollectorRegistry(), app[CONFIG])
    app[BUDGET] = create_engine(settings.store, clock, store, observe=metrics.store_operation)
    app[CACHE] = create_cache(settings.store, app[BUDGET].store, clock, cache_store)
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
    app.cleanup_ctx.append(response_cache)        # closed before the budget store, whose client it may share
    add_budget_alerts(app, sleep=sleep)
    app[ROUTER] = router = Router(CanaryRuns(app[BUDGET].store, clock), rng)
    metrics.registry.register(ArmCollector(router.counts))
    app.cleanup_ctx.append(canary_sync)
    if config_path is not None:
        app.cleanup_ctx.append(config_reload)
    add_routes(app)
    return app


def add_routes(app: web.Application) -> None:
    """Register every endpoint: the forwarded OpenAI ones, then the gateway's own."""
    add_proxy_routes(app)
    add_info_routes(app)
    add_provider_status_routes(app)
    add_budget_routes(app)
    add_rate_limit_routes(app)
    add_metrics_routes(app)
    add_ui_routes(app)


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

    async with running(app, "journal_replay", step):
        yield
    await engine.close()


async def response_cache(app: web.Application) -> AsyncIterator[None]:
    """Count the cache's storage failures; finish the cache writes under way and close its storage at the end."""
    app[METRICS].follow_cache(app[CACHE])
    yield
    await app[CACHE].close()


async def canary_sync(app: web.Application) -> AsyncIterator[None]:
    """Read every canary's step before serving, then share tallies and steps with the store in the background.

    A rollback this replica makes is announced to the policies' alert receivers.
    """
    runs, config = app[ROUTER].canaries, app[CONFIG]
    if ALERTS in app:
        runs.on_rollback.append(announce_rollbacks(app[ALERTS]))

    async def step() -> None:
        await asyncio.sleep(canary_runs.SYNC_INTERVAL_S)
        await runs.sync(config.current)

    try:
        await runs.sync(config.current)
    except Exception as error:               # never keeps the gateway from starting: canaries wait on control
        app[BACKGROUND].failed("canary_sync", error)
    async with running(app, "canary_sync", step):
        yield


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
    async with running(app, "config_reload", reloader.poll):
        yield


def add_budget_alerts(app: web.Application, *, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
    """Listen to the engine's settles and deliver webhook alerts for the app's lifetime."""
    engine = app[BUDGET]
    if engine.store is None:
        return
    app[ALERTS] = sender = AlertSender(engine.store, app[CONFIG], app[CLOCK], app[BACKGROUND], sleep=sleep)
    engine.on_settled.append(sender.observe)
    app[FORECASTS] = ForecastAlerts(engine, app[CONFIG], sender)
    app.cleanup_ctx.append(alert_delivery)
    app.cleanup_ctx.append(forecast_watch)


async def alert_delivery(app: web.Application) -> AsyncIterator[None]:
    """One ClientSession and the delivery loops; both end with the app, cancelling a delivery in flight."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT_S)) as session:
        app[ALERTS].start(session)
        yield
        await app[ALERTS].stop()


async def forecast_watch(app: web.Application) -> AsyncIterator[None]:
    """Check the budgets' forecasts every CHECK_S for the app's lifetime (gateway.budget.forecast_alerts)."""
    async def step() -> None:
        await app[FORECASTS].check()
        await asyncio.sleep(CHECK_S)

    async with running(app, "forecast_alerts", step):
        yield


@contextlib.asynccontextmanager
async def running(app: web.Application, name: str, step: Callable[[], Awaitable[object]]) -> AsyncIterator[None]:
    """`step` again and again in a background task named `name` (see keep_running) while the block runs."""
    task = asyncio.create_task(keep_running(name, step, app[BACKGROUND]))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
