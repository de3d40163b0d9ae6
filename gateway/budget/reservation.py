"""A request's hold on its budgets, carried from reservation to settlement, and a refusal that downgrades."""

from __future__ import annotations

from typing import NamedTuple

from gateway.budget.store import ReserveLine
from gateway.config.model import CallerIdentity
from gateway.domain.plan import Plan
from gateway.domain.worst_case import WorstCase
from gateway.errors import BudgetExceeded

__all__ = ["Reservation", "Downgrade"]


class Reservation(NamedTuple):
    """A request's hold on its budgets; `plan` may be a downgraded one, `worst` bounds its charge and output."""

    request_id: str
    plan: Plan
    worst: WorstCase                     # what is held (with no lines: what would have been), see worst_case
    lines: tuple[ReserveLine, ...] = ()
    local: bool = False                 # held in this replica's fail-open allowance, not in the store
    downgraded_from: str | None = None
    caller: CallerIdentity | None = None

    policies: tuple[str, ...] = ()       # names of the policies it holds budget on
    spare_id: str | None = None          # held under a spare reservation's id (see gateway.budget.spares)
    headers: dict[str, str] | None = None    # x-ratelimit-* of the tightest rate limit (gateway.budget.rate_refusals)
    skip: frozenset[str] = frozenset()       # providers at their own rate limit: not called for this request

    @property
    def held_as(self) -> str:
        """The id the store holds the reservation under."""
        return self.spare_id or self.request_id


class Downgrade(NamedTuple):
    """A refusal by a policy that downgrades: the caller plans `model` and reserves on it, else raises `refusal`."""

    model: str                           # the refusing policy's cheaper model
    downgraded_from: str                 # the model refused
    refusal: BudgetExceeded              # the 429 when the cheaper model does not fit either
