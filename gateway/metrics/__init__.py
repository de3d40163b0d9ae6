"""Prometheus metrics: in-process instruments fed by observers, budget gauges read from the store at scrape.

    instruments  GatewayMetrics: the metrics and the callbacks that update them
    labels       label values bounded by the active config
    scrape       budget windows, breaker states and config reloads read per scrape
    merge        sibling workers' families summed into one exposition (`gateway run --workers N`)
    endpoint     GET /metrics
"""

from __future__ import annotations

from gateway.metrics.endpoint import add_metrics_routes
from gateway.metrics.instruments import GatewayMetrics

__all__ = ["GatewayMetrics", "add_metrics_routes"]
