"""Typed keys for the objects the aiohttp application shares (no module-level singletons)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from gateway.observability.access_log import AccessLog
    from gateway.background import BackgroundFailures
    from gateway.budget.alerts import AlertSender
    from gateway.budget.engine import BudgetEngine
    from gateway.budget.forecast_alerts import ForecastAlerts
    from gateway.cache.service import ResponseCache
    from gateway.clock import Clock
    from gateway.http.wire_hits import WireHits
    from gateway.config.holder import ConfigHolder
    from gateway.config.reload import ConfigReloader
    from gateway.observability.instruments import GatewayMetrics
    from gateway.peers import Peers
    from gateway.upstream.open_streams import OpenStreams
    from gateway.upstream.providers import ProviderPool
    from gateway.resilience.registry import ResilienceRegistry
    from gateway.routing.router import Router

__all__ = ["CONFIG", "CLOCK", "PROVIDERS", "BUDGET", "ACCESS_LOG", "RESILIENCE", "RELOADER", "METRICS", "ALERTS", "BACKGROUND",
           "PEERS", "OPEN_STREAMS", "ROUTER", "CACHE", "FORECASTS", "WIRE_HITS"]

CONFIG: web.AppKey[ConfigHolder] = web.AppKey("config")
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
PROVIDERS: web.AppKey[ProviderPool] = web.AppKey("providers")
BUDGET: web.AppKey[BudgetEngine] = web.AppKey("budget")
ACCESS_LOG: web.AppKey[AccessLog] = web.AppKey("access_log")
RESILIENCE: web.AppKey[ResilienceRegistry] = web.AppKey("resilience")
RELOADER: web.AppKey[ConfigReloader] = web.AppKey("reloader")
METRICS: web.AppKey[GatewayMetrics] = web.AppKey("metrics")
ALERTS: web.AppKey[AlertSender] = web.AppKey("alerts")
FORECASTS: web.AppKey[ForecastAlerts] = web.AppKey("forecasts")
BACKGROUND: web.AppKey[BackgroundFailures] = web.AppKey("background")
PEERS: web.AppKey[Peers] = web.AppKey("peers")
OPEN_STREAMS: web.AppKey[OpenStreams] = web.AppKey("open_streams")
ROUTER: web.AppKey[Router] = web.AppKey("router")
CACHE: web.AppKey[ResponseCache] = web.AppKey("cache")
WIRE_HITS: web.AppKey[WireHits] = web.AppKey("wire_hits")
