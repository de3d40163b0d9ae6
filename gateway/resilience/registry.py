"""One circuit breaker and one retry budget per provider, kept across requests and config reloads.

The registry is the seam between the request path and later observers: metrics and logs append to
`on_transition`, `on_retry`, `on_failover` and `on_attempt`; this module imports neither.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from gateway.clock import Clock
from gateway.config.model import ProviderConfig, RetryConfig, Settings
from gateway.resilience.breaker import CircuitBreaker, Transition, TransitionCallback
from gateway.resilience.retry import RetryBudget

__all__ = ["RetryCallback", "FailoverCallback", "AttemptCallback", "Sleep", "ResilienceRegistry"]

logger = logging.getLogger(__name__)

RetryCallback = Callable[[str, str], None]        # (provider, reason)
FailoverCallback = Callable[[str, str], None]     # (from_provider, to_provider)
AttemptCallback = Callable[[str, float, str], None]  # (provider, seconds to response head, status or error)
Sleep = Callable[[float], Awaitable[None]]


class ResilienceRegistry:
    """The live breakers and retry budgets by provider name, with callback lists for observers."""

    def __init__(self, settings: Settings, clock: Clock, *, sleep: Sleep = asyncio.sleep) -> None:
        self.clock = clock
        self.sleep = sleep
        self.on_transition: list[TransitionCallback] = []
        self.on_retry: list[RetryCallback] = []
        self.on_failover: list[FailoverCallback] = []
        self.on_attempt: list[AttemptCallback] = []
        self._breakers: dict[str, CircuitBreaker] = {}
        self._budgets: dict[str, RetryBudget] = {}
        self._providers: dict[str, ProviderConfig] = {}
        self.retry = settings.retry
        self._breaker_config = settings.breaker
        self.sync(settings)

    def sync(self, settings: Settings) -> None:
        """Follow a config reload: keep the state of unchanged providers, start the others afresh.

        A changed `breaker` section restarts every breaker, a changed retry budget every budget.
        """
        breaker_changed = settings.breaker != self._breaker_config
        budget_changed = _budget_terms(settings.retry) != _budget_terms(self.retry)
        self._breaker_config, self.retry = settings.breaker, settings.retry
        keep = {name for name, config in settings.providers.items() if self._providers.get(name) == config}
        self._breakers = {name: self._breakers[name] if name in keep and not breaker_changed
                          else self._new_breaker(name) for name in settings.providers}
        self._budgets = {name: self._budgets[name] if name in keep and not budget_changed
                         else self._new_budget() for name in settings.providers}
        self._providers = dict(settings.providers)

    def breaker(self, name: str) -> CircuitBreaker:
        """The breaker of provider `name` (created on first use for a provider not yet synced)."""
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = self._breakers[name] = self._new_breaker(name)
        return breaker

    def budget(self, name: str) -> RetryBudget:
        """The retry budget of provider `name` (created on first use for a provider not yet synced)."""
        budget = self._budgets.get(name)
        if budget is None:
            budget = self._budgets[name] = self._new_budget()
        return budget

    def snapshot(self) -> list[dict[str, Any]]:
        """Every provider's breaker state, `open_until` in epoch seconds or None."""
        return [{"provider": name, **breaker.snapshot()} for name, breaker in self._breakers.items()]

    def reopens_in(self, providers: Iterable[str]) -> float | None:
        """Seconds until the first open breaker among `providers` half-opens; None when none is open."""
        now = self.clock.now()
        ends = [until for name in providers if (until := self.breaker(name).snapshot()["open_until"]) is not None]
        return max(0.0, min(ends) - now) if ends else None

    def retried(self, provider: str, reason: str) -> None:
        """Tell the `on_retry` callbacks that `provider` is being retried for `reason`."""
        self._notify(self.on_retry, provider, reason)

    def failed_over(self, from_provider: str, to_provider: str) -> None:
        """Tell the `on_failover` callbacks that a request moved on from one provider to the next."""
        self._notify(self.on_failover, from_provider, to_provider)

    def attempted(self, provider: str, seconds: float, outcome: str) -> None:
        """Tell the `on_attempt` callbacks how long one upstream call took to answer, and how it ended."""
        self._notify(self.on_attempt, provider, seconds, outcome)

    def _transitioned(self, event: Transition) -> None:
        """Fan one breaker transition out to the current `on_transition` callbacks."""
        self._notify(self.on_transition, event)

    def _new_breaker(self, name: str) -> CircuitBreaker:
        return CircuitBreaker(name, self._breaker_config, self.clock, on_transition=(self._transitioned,))

    def _new_budget(self) -> RetryBudget:
        return RetryBudget(self.retry.budget_ratio, self.retry.budget_floor)

    @staticmethod
    def _notify(callbacks: list[Callable[..., None]], *args: Any) -> None:
        """Call each callback; one that raises is logged and does not stop the others or the request."""
        for callback in list(callbacks):
            try:
                callback(*args)
            except Exception:
                logger.exception("resilience callback %r failed", callback)


def _budget_terms(config: RetryConfig) -> tuple[float, int]:
    """The parts of the retry config a RetryBudget is built from."""
    return config.budget_ratio, config.budget_floor
