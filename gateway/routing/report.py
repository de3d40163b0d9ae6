"""What status and `gateway status` show of each canary: its step, status and each arm's figures in the step."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

from gateway.budget.canary_record import CanaryRecord
from gateway.domain.pricing import format_usd
from gateway.routing.canary import ArmFigures, figures, percent
from gateway.routing.canary_runs import CanaryRun
from gateway.routing.router import CANDIDATE, CONTROL

__all__ = ["canary_entry"]


def canary_entry(run: CanaryRun, record: CanaryRecord) -> dict[str, Any]:
    """One canary's public status (providers by name; never a key or URL)."""
    config = run.config
    return {
        "route": run.route,
        "control": config.control.provider,
        "candidate": config.candidate.provider,
        "status": record.status,
        "step": record.step + 1,
        "steps": list(config.steps),
        "candidate_percent": percent(config, record),
        "step_since": datetime.fromtimestamp(record.since, tz=timezone.utc).isoformat(),
        "arms": {CONTROL: _arm(figures(record.arms[0])), CANDIDATE: _arm(figures(record.arms[1]))},
    }


def _arm(arm: ArmFigures) -> dict[str, Any]:
    """An arm's figures: requests, error rate, p95 latency (s) and USD per served request."""
    cost = arm.cost_per_request_nano
    return {
        "requests": arm.requests,
        "error_rate": round(arm.error_rate, 4),
        "p95_latency_s": None if arm.p95_latency_s is None else round(arm.p95_latency_s, 4),
        "cost_per_request_usd": None if cost is None else format_usd(int(Decimal(cost).to_integral_value())),
    }
