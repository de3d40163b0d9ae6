"""The spend ledger row of one request, built from its reservation and the facts of serving it."""

from __future__ import annotations

import time

from gateway.budget.reservation import Reservation
from gateway.budget.store import LedgerEntry
from gateway.config.model import CallerIdentity
from gateway.domain.ledger_facts import LedgerFacts
from gateway.domain.pricing import Charge

__all__ = ["ledger_entry", "cache_hit_entry"]


def ledger_entry(reservation: Reservation, charge: Charge | None, facts: LedgerFacts | None,
                 now: float) -> LedgerEntry:
    """`served` with the charged cost, or `failed` (no spend) when there is no charge; under the served model."""
    caller = reservation.caller
    name, team = (caller.name, caller.team) if caller else (None, None)
    model: str | None
    user, session = (facts.user, facts.session) if facts is not None else (None, None)
    if facts is None:
        model, requested, provider, latency_ms, attempts, endpoint = reservation.plan.model, None, None, 0, 0, None
    else:
        model, requested, provider, attempts = facts.model, facts.requested_model, facts.provider, facts.attempts
        latency_ms, endpoint = round((time.perf_counter() - facts.started) * 1000), facts.endpoint
    usage = facts.usage if facts is not None and charge is not None else None
    prompt, completion, cached = (usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens) if usage \
        else (0, 0, 0)
    return LedgerEntry(now, reservation.request_id, name, team, reservation.policies, model,
                       provider, prompt, completion, cached, charge.usd_nano if charge else 0,
                       "failed" if charge is None else "served", latency_ms, attempts, requested,
                       usage is not None and usage.estimated, 0, endpoint,
                       usage.cache_write_tokens if usage is not None else 0, user, session)


def cache_hit_entry(request_id: str, caller: CallerIdentity, policies: tuple[str, ...], facts: LedgerFacts,
                    saved_nano: int, now: float) -> LedgerEntry:
    """`cache_hit`: no tokens, no cost (so ledger totals still equal the counters), and what the answer saved."""
    latency_ms = round((time.perf_counter() - facts.started) * 1000)
    return LedgerEntry(now, request_id, caller.name, caller.team, policies, facts.model, None, 0, 0, 0, 0,
                       "cache_hit", latency_ms, 0, facts.requested_model, False, saved_nano, facts.endpoint, 0,
                       facts.user, facts.session)
