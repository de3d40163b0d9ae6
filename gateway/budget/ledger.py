"""The spend ledger row of one request, built from its reservation and what the gateway saw serving it."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from gateway.access_log import AccessRecord
from gateway.budget.store import LedgerEntry
from gateway.pricing import Charge

if TYPE_CHECKING:
    from gateway.budget.engine import Reservation

__all__ = ["ledger_entry"]


def ledger_entry(reservation: Reservation, charge: Charge | None, record: AccessRecord | None,
                 now: float) -> LedgerEntry:
    """`served` with the charged cost, or `failed` (no spend) when there is no charge."""
    usage = record.usage if record is not None and charge is not None else None
    caller = reservation.caller
    return LedgerEntry(
        time=now, request_id=reservation.request_id,
        caller=caller.name if caller else None, team=caller.team if caller else None,
        policies=reservation.policies, model=reservation.plan.model,
        provider=record.provider if record else None,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        cached_tokens=usage.cached_tokens if usage else 0,
        cost_nano=charge.usd_nano if charge else 0,
        status="failed" if charge is None else "served",
        latency_ms=round((time.perf_counter() - record.started) * 1000) if record else 0,
        attempts=record.attempts if record else 0,
    )
