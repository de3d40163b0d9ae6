"""The canary state machine: from a canary's shared record, its config and the time, the move to make, if any.

    ramping  -- a rollback_if condition holds ------------------------------------> rolled_back (0%)
    ramping  -- promote_after holds (requests and minutes), none of rollback_if --> the next step
    the next step is the last (100%)  ---------------------------------------------> promoted
    promoted, rolled_back: final until the canary's config changes (a new canary)

rollback_if is judged once the candidate has `judged_from` requests in the step, and again on every sync
after: the candidate's error rate against `error_rate`; its p95 latency and cost per served request over
the control's (when both arms have served that many) against the ratios. `decide` is pure: replicas call
it on the record they read, and the store's compare-and-set on the step lets one of them make the move.
"""

from __future__ import annotations

from fractions import Fraction
from typing import NamedTuple

from gateway.budget.canary_record import PROMOTED, RAMPING, ROLLED_BACK, ArmTally, CanaryRecord, CanaryStatus
from gateway.config.routes import CanaryConfig, RollbackIf
from gateway.routing.latency import p95_s

__all__ = ["Move", "ArmFigures", "figures", "decide", "percent"]


class Move(NamedTuple):
    """A transition: to which step, with which status, and why (said in logs and the rollback alert)."""

    to_step: int
    status: CanaryStatus
    reason: str


class ArmFigures(NamedTuple):
    """An arm's figures in a step."""

    requests: int
    errors: int
    error_rate: float
    p95_latency_s: float | None
    cost_per_request_nano: float | None      # over the answers it served


def figures(tally: ArmTally) -> ArmFigures:
    """The figures of an arm's tally."""
    served = tally.requests - tally.errors
    return ArmFigures(tally.requests, tally.errors, tally.errors / tally.requests if tally.requests else 0.0,
                      p95_s(tally.latency), tally.cost_nano / served if served > 0 else None)


def percent(canary: CanaryConfig, record: CanaryRecord) -> int:
    """The share of requests the candidate gets in `record`'s state."""
    if record.status == ROLLED_BACK:
        return 0
    if record.status == PROMOTED:
        return 100
    return canary.steps[min(record.step, len(canary.steps) - 1)]


def decide(canary: CanaryConfig, record: CanaryRecord, now: float) -> Move | None:
    """The move `record` calls for at `now`, or None while the step goes on."""
    if record.status != RAMPING:
        return None
    last = len(canary.steps) - 1
    if record.step >= last:
        return Move(last, PROMOTED, f"reached {canary.steps[last]}%")
    control, candidate = figures(record.arms[0]), figures(record.arms[1])
    if candidate.requests >= canary.judged_from:
        why = rollback_reason(canary.rollback_if, control, candidate, canary.judged_from)
        if why is not None:
            return Move(record.step, ROLLED_BACK, why)
    promote = canary.promote_after
    enough = candidate.requests >= max(promote.requests, canary.judged_from)
    if enough and now - record.since >= promote.minutes * 60:
        step = record.step + 1
        return Move(step, PROMOTED if step == last else RAMPING, f"step {canary.steps[record.step]}% passed")
    return None


def rollback_reason(rules: RollbackIf, control: ArmFigures, candidate: ArmFigures, judged_from: int) -> str | None:
    """Why the candidate is rolled back, or None; ratios only when the control has served enough to compare."""
    if rules.error_rate is not None and Fraction(candidate.errors, candidate.requests) > rules.error_rate:
        return f"candidate error rate {candidate.error_rate:.1%} over {float(rules.error_rate):.1%}"
    if control.requests < judged_from:
        return None
    latency = _ratio(candidate.p95_latency_s, control.p95_latency_s)
    if rules.p95_latency_ratio is not None and latency is not None and latency > rules.p95_latency_ratio:
        return f"candidate p95 latency {latency:.2f}x the control's (limit {rules.p95_latency_ratio:g}x)"
    cost = _ratio(candidate.cost_per_request_nano, control.cost_per_request_nano)
    if rules.cost_per_request_ratio is not None and cost is not None and cost > rules.cost_per_request_ratio:
        return f"candidate cost per request {cost:.2f}x the control's (limit {rules.cost_per_request_ratio:g}x)"
    return None


def _ratio(candidate: float | None, control: float | None) -> float | None:
    """candidate / control, when both are known and the control's is above zero."""
    if candidate is None or control is None or control <= 0:
        return None
    return candidate / control
