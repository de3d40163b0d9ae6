"""The 429s of refused requests: which policy, which period, which limit, when to try again."""

from __future__ import annotations

from gateway.budget.windows import Window, seconds_until_reset
from gateway.config.model import Policy
from gateway.domain.pricing import format_usd
from gateway.errors import BudgetExceeded

__all__ = ["exceeded_error", "held_error", "policy_period"]


def exceeded_error(policy: Policy, window: Window, unit: str, limit: int, now: float) -> BudgetExceeded:
    """The 429 a refused request gets: which policy, which period, which limit, when it resets."""
    resets_at = window.end.isoformat()
    message = (f"Budget exceeded: policy '{policy.name}' {policy_period(window)} limit of "
               f"{_format_limit(unit, limit)} does not allow this request; the window resets at {resets_at}.")
    error = BudgetExceeded(message, headers={
        "Retry-After": str(seconds_until_reset(window, now)), "x-should-retry": "false"})
    error.policy, error.period = policy.name, policy_period(window)
    return error


def held_error(policy: Policy, window: Window, unit: str, limit: int) -> BudgetExceeded:
    """The 429 of a request refused only while reservations in flight hold the room: retry in a second."""
    message = (f"Budget busy: policy '{policy.name}' {policy_period(window)} limit of {_format_limit(unit, limit)} "
               "is held by requests in flight (and spare reservations, released after a second unused); "
               "try again in a second.")
    error = BudgetExceeded(message, headers={"Retry-After": "1", "x-should-retry": "true"})
    error.policy, error.period = policy.name, policy_period(window)
    return error


def policy_period(window: Window) -> str:
    """"daily" or "monthly": the period a window belongs to."""
    return "daily" if window.id.startswith("d") else "monthly"


def _format_limit(unit: str, limit: int) -> str:
    return f"{format_usd(limit)} USD" if unit == "usd" else f"{limit} {unit}"
