"""Circuit breaker per provider: explicit states, a legal-transition table, one transition function.

    CLOSED ──(failure rate over the window, or N consecutive failures)──> OPEN
    OPEN ──(open period elapsed; checked lazily on acquire or state read)──> HALF_OPEN
    HALF_OPEN ──(a probe succeeded)──> CLOSED
    HALF_OPEN ──(a probe failed; the next open period doubles, capped)──> OPEN

Every change goes through `CircuitBreaker._transition`, which checks `TRANSITIONS` and publishes a
`Transition` to the callbacks (metrics, logs subscribe there; this module imports neither).
The breaker is meant for one asyncio event loop and takes no locks.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from gateway.clock import Clock
from gateway.config.model import BreakerConfig
from gateway.resilience.window import SlidingWindow

__all__ = [
    "BreakerState", "TRANSITIONS", "Transition", "TransitionCallback", "IllegalTransition",
    "Permit", "CircuitBreaker",
]

logger = logging.getLogger(__name__)


class BreakerState(enum.Enum):
    """Where a breaker is."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


TRANSITIONS: dict[BreakerState, frozenset[BreakerState]] = {
    BreakerState.CLOSED: frozenset({BreakerState.OPEN}),
    BreakerState.OPEN: frozenset({BreakerState.HALF_OPEN}),
    BreakerState.HALF_OPEN: frozenset({BreakerState.CLOSED, BreakerState.OPEN}),
}


@dataclass(frozen=True)
class Transition:
    """One state change of one provider's breaker; `at` is epoch seconds."""

    provider: str
    old: BreakerState
    new: BreakerState
    at: float
    reason: str


TransitionCallback = Callable[[Transition], None]


class IllegalTransition(RuntimeError):
    """A transition the table does not allow: a bug in the breaker, never a runtime condition."""

    def __init__(self, old: BreakerState, new: BreakerState) -> None:
        super().__init__(f"illegal breaker transition {old.value} -> {new.value}")
        self.old = old
        self.new = new


class _Outcome(enum.Enum):
    """How a permit was settled."""

    SUCCESS = "success"
    FAILURE = "failure"
    IGNORED = "ignored"


class Permit:
    """Leave to make one upstream call; settle it exactly once, in a `finally`.

    `success()` and `failure()` count towards the breaker; `ignore()` counts as neither (a client
    error other than 429, a cancelled request, a client that went away) and hands a half-open probe
    slot back. Calls after the first are no-ops, so `finally: permit.ignore()` is always safe.
    """

    __slots__ = ("_breaker", "_generation", "_probe", "_settled")

    def __init__(self, breaker: CircuitBreaker, generation: int, probe: bool) -> None:
        self._breaker = breaker
        self._generation = generation
        self._probe = probe
        self._settled = False

    @property
    def probe(self) -> bool:
        """True when this call is a half-open probe."""
        return self._probe

    @property
    def settled(self) -> bool:
        """True once success(), failure() or ignore() was called."""
        return self._settled

    def success(self) -> None:
        """The upstream answered well."""
        if not self._settled:
            self._settle(_Outcome.SUCCESS)

    def failure(self) -> None:
        """The upstream failed (5xx, 429, connection error, timeout)."""
        if not self._settled:
            self._settle(_Outcome.FAILURE)

    def ignore(self) -> None:
        """The call says nothing about the upstream's health."""
        if not self._settled:                # the usual case in a `finally`: already settled
            self._settle(_Outcome.IGNORED)

    def _settle(self, outcome: _Outcome) -> None:
        """Report the outcome once."""
        if self._settled:
            return
        self._settled = True
        self._breaker._settle(self._generation, self._probe, outcome)


class CircuitBreaker:
    """One provider's breaker; `acquire()` before each upstream call and settle the permit."""

    def __init__(self, name: str, config: BreakerConfig, clock: Clock,
                 on_transition: Sequence[TransitionCallback] = ()) -> None:
        self._name = name
        self._config = config
        self._clock = clock
        self._callbacks = tuple(on_transition)
        self._window = SlidingWindow(config.window_s)
        self._state = BreakerState.CLOSED
        self._generation = 0                 # bumps on every transition; stale permits are ignored
        self._consecutive_failures = 0
        self._consecutive_opens = 0
        self._open_until: float | None = None  # monotonic; set only while OPEN
        self._probes_in_flight = 0

    @property
    def name(self) -> str:
        """The provider this breaker guards."""
        return self._name

    @property
    def state(self) -> BreakerState:
        """The current state (an elapsed open period turns into HALF_OPEN here)."""
        self._refresh()
        return self._state

    def acquire(self) -> Permit | None:
        """A permit to call the upstream, or None when the breaker rejects the call."""
        self._refresh()
        if self._state is BreakerState.OPEN:
            return None
        if self._state is BreakerState.HALF_OPEN:
            return self._acquire_probe()
        return Permit(self, self._generation, False)

    def snapshot(self) -> dict[str, Any]:
        """State for the admin API: state, failure_rate, calls_in_window, open_until, consecutive_opens."""
        self._refresh()
        calls, failures = self._window.counts(self._clock.monotonic())
        return {
            "state": self._state.value,
            "failure_rate": failures / calls if calls else 0.0,
            "calls_in_window": calls,
            "open_until": self._open_until_epoch(),
            "consecutive_opens": self._consecutive_opens,
        }

    def _acquire_probe(self) -> Permit | None:
        """One of at most `half_open_probes` concurrent probes, or None."""
        if self._probes_in_flight >= self._config.half_open_probes:
            return None
        self._probes_in_flight += 1
        return Permit(self, self._generation, probe=True)

    def _settle(self, generation: int, probe: bool, outcome: _Outcome) -> None:
        """Apply a permit's outcome, unless the permit belongs to a state since left."""
        if generation != self._generation:
            return
        if probe:
            self._settle_probe(outcome)
        else:
            self._settle_closed(outcome)

    def _settle_probe(self, outcome: _Outcome) -> None:
        """A probe's outcome decides HALF_OPEN; an ignored probe frees its slot."""
        self._probes_in_flight -= 1
        if outcome is _Outcome.SUCCESS:
            self._transition(BreakerState.CLOSED, "probe succeeded")
        elif outcome is _Outcome.FAILURE:
            self._transition(BreakerState.OPEN, "probe failed")

    def _settle_closed(self, outcome: _Outcome) -> None:
        """Count a CLOSED call and open the breaker when a threshold is crossed."""
        if outcome is _Outcome.IGNORED:
            return
        ok = outcome is _Outcome.SUCCESS
        now = self._clock.monotonic()
        self._window.record(ok, now)
        if ok:                               # a success never opens the breaker
            self._consecutive_failures = 0
            return
        self._consecutive_failures += 1
        reason = self._trip_reason(now)
        if reason is not None:
            self._transition(BreakerState.OPEN, reason)

    def _trip_reason(self, now: float) -> str | None:
        """Why CLOSED should open now, or None."""
        config = self._config
        if self._consecutive_failures >= config.consecutive_failures:
            return f"{self._consecutive_failures} consecutive failures"
        calls, failures = self._window.counts(now)
        if calls >= config.min_calls and failures / calls >= config.failure_rate:
            return f"failure rate {failures}/{calls} in {config.window_s:g}s >= {config.failure_rate:g}"
        return None

    def _refresh(self) -> None:
        """Turn OPEN into HALF_OPEN once the open period has elapsed."""
        if self._open_until is not None and self._clock.monotonic() >= self._open_until:
            self._transition(BreakerState.HALF_OPEN, "open period elapsed")

    def _open_until_epoch(self) -> float | None:
        """When the open period ends, in epoch seconds; None unless OPEN."""
        if self._open_until is None:
            return None
        return self._clock.now() + (self._open_until - self._clock.monotonic())

    def _open_duration(self) -> float:
        """open_s doubled for each consecutive open after the first, capped at open_max_s."""
        doublings = min(self._consecutive_opens - 1, 64)
        return min(self._config.open_max_s, self._config.open_s * 2.0 ** doublings)

    def _transition(self, new: BreakerState, reason: str) -> None:
        """The only place state changes: check the table, run the entry action, publish."""
        old = self._state
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(old, new)
        self._state = new
        self._generation += 1
        self._enter(new)
        self._publish(Transition(self._name, old, new, self._clock.now(), reason))

    def _enter(self, state: BreakerState) -> None:
        """Entry action of `state`."""
        self._probes_in_flight = 0
        self._open_until = None
        if state is BreakerState.OPEN:
            self._consecutive_opens += 1
            self._open_until = self._clock.monotonic() + self._open_duration()
        elif state is BreakerState.CLOSED:
            self._consecutive_opens = 0
            self._consecutive_failures = 0
            self._window.clear()

    def _publish(self, event: Transition) -> None:
        """Call every callback; one that raises is logged and does not stop the others."""
        for callback in self._callbacks:
            try:
                callback(event)
            except Exception:
                logger.exception("breaker %s: transition callback %r failed", self._name, callback)
