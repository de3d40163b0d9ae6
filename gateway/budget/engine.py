"""Budget enforcement: reserve the worst case before the upstream call, settle the real cost after."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.config.model import CallerIdentity, Settings
from gateway.pricing import Charge
from gateway.proxy.plan import Plan
from gateway.proxy.request import ProxyRequest

__all__ = ["Reservation", "BudgetEngine"]


@dataclass(frozen=True)
class Reservation:
    """A request's hold on its budgets; `plan` may be a downgraded one."""

    request_id: str
    plan: Plan


class BudgetEngine:
    """Placeholder until the store lands: reserves nothing."""

    async def reserve(self, request_id: str, settings: Settings, caller: CallerIdentity,
                      plan: Plan, req: ProxyRequest) -> Reservation:
        return Reservation(request_id, plan)

    async def settle(self, reservation: Reservation, charge: Charge | None) -> None:
        return None

    async def ping(self) -> bool:
        return True
