"""Circuit breaker and its sliding window: a fake clock moves, nothing sleeps."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.clock import FakeClock
from gateway.config.model import BreakerConfig
from gateway.resilience.breaker import (
    TRANSITIONS,
    BreakerState,
    CircuitBreaker,
    IllegalTransition,
    Permit,
    Transition,
)
from gateway.resilience.window import SlidingWindow

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN

CONFIG = BreakerConfig(window_s=30.0, min_calls=10, failure_rate=0.5, consecutive_failures=5,
                       open_s=15.0, open_max_s=50.0, half_open_probes=2)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def events() -> list[Transition]:
    return []


@pytest.fixture
def breaker(clock: FakeClock, events: list[Transition]) -> CircuitBreaker:
    return CircuitBreaker("openai", CONFIG, clock, on_transition=[events.append])


def call(breaker: CircuitBreaker, outcome: str) -> None:
    """Make one call through the breaker and settle it with `outcome`."""
    permit = breaker.acquire()
    assert permit is not None
    getattr(permit, outcome)()


def trip(breaker: CircuitBreaker) -> None:
    """Open a closed breaker with consecutive failures."""
    for _ in range(CONFIG.consecutive_failures):
        call(breaker, "failure")
    assert breaker.state is OPEN


def half_open(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """Trip the breaker and wait out the open period."""
    trip(breaker)
    clock.advance(CONFIG.open_s)


# --- transition table ---------------------------------------------------------------------------

def test_transition_table_is_exactly_the_legal_moves() -> None:
    assert TRANSITIONS == {
        CLOSED: frozenset({OPEN}),
        OPEN: frozenset({HALF_OPEN}),
        HALF_OPEN: frozenset({CLOSED, OPEN}),
    }


@pytest.mark.parametrize("new", [CLOSED, HALF_OPEN])
def test_illegal_transition_from_closed_raises(breaker: CircuitBreaker, new: BreakerState,
                                               events: list[Transition]) -> None:
    with pytest.raises(IllegalTransition):
        breaker._transition(new, "test")
    assert breaker.state is CLOSED
    assert events == []


@pytest.mark.parametrize("new", [OPEN, CLOSED])
def test_illegal_transition_from_open_raises(breaker: CircuitBreaker, new: BreakerState) -> None:
    trip(breaker)
    with pytest.raises(IllegalTransition):
        breaker._transition(new, "test")
    assert breaker.state is OPEN


# --- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("change", [
    {"window_s": 0}, {"min_calls": 0}, {"failure_rate": 0}, {"failure_rate": 1.5},
    {"failure_rate": float("nan")}, {"consecutive_failures": 0}, {"open_s": -1},
    {"open_max_s": 10.0}, {"half_open_probes": 0},
])
def test_nonsensical_config_is_rejected(clock: FakeClock, change: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(change))):
        CircuitBreaker("openai", dataclasses.replace(CONFIG, **change), clock)


# --- closed -> open -----------------------------------------------------------------------------

def test_opens_on_failure_rate_once_min_calls_reached(breaker: CircuitBreaker) -> None:
    for outcome in ["success", "failure"] * 4 + ["success"]:
        call(breaker, outcome)
    assert breaker.state is CLOSED            # 9 calls: below min_calls although 44% fail
    call(breaker, "failure")                  # 10 calls, 5 failures: 50%
    assert breaker.state is OPEN


def test_failure_rate_forgets_calls_older_than_the_window(breaker: CircuitBreaker,
                                                          clock: FakeClock) -> None:
    for _ in range(4):
        call(breaker, "failure")
        call(breaker, "success")
    clock.advance(CONFIG.window_s)
    for outcome in ["success"] * 9 + ["failure"]:
        call(breaker, outcome)
    assert breaker.state is CLOSED
    assert breaker.snapshot()["calls_in_window"] == 10


def test_opens_on_consecutive_failures_below_min_calls(breaker: CircuitBreaker) -> None:
    for _ in range(CONFIG.consecutive_failures - 1):
        call(breaker, "failure")
    call(breaker, "success")                  # breaks the run
    for _ in range(CONFIG.consecutive_failures - 1):
        call(breaker, "failure")
    assert breaker.state is CLOSED
    call(breaker, "failure")
    assert breaker.state is OPEN


def test_client_errors_are_ignored(breaker: CircuitBreaker) -> None:
    for _ in range(50):
        call(breaker, "ignore")
    assert breaker.state is CLOSED
    assert breaker.snapshot()["calls_in_window"] == 0


def test_permit_settles_once(breaker: CircuitBreaker) -> None:
    permit = breaker.acquire()
    assert permit is not None
    permit.success()
    for _ in range(10):
        permit.failure()
    assert permit.settled
    assert breaker.snapshot()["calls_in_window"] == 1
    assert breaker.snapshot()["failure_rate"] == 0.0


def test_a_late_outcome_from_a_closed_call_does_not_touch_half_open(breaker: CircuitBreaker,
                                                                     clock: FakeClock) -> None:
    slow = breaker.acquire()
    assert slow is not None
    half_open(breaker, clock)
    probe = breaker.acquire()
    assert probe is not None and probe.probe
    slow.failure()                            # acquired while CLOSED: stale, ignored
    assert breaker.state is HALF_OPEN


# --- open and half-open -------------------------------------------------------------------------

def test_open_rejects_until_open_s_then_admits_exactly_k_probes(breaker: CircuitBreaker,
                                                                clock: FakeClock) -> None:
    trip(breaker)
    clock.advance(CONFIG.open_s - 0.5)
    assert breaker.acquire() is None
    clock.advance(0.5)
    probes = [breaker.acquire() for _ in range(CONFIG.half_open_probes + 3)]
    admitted = [p for p in probes if p is not None]
    assert len(admitted) == CONFIG.half_open_probes
    assert all(p.probe for p in admitted)
    assert breaker.state is HALF_OPEN


def test_probe_success_closes_and_clears_the_window(breaker: CircuitBreaker,
                                                   clock: FakeClock) -> None:
    half_open(breaker, clock)
    call(breaker, "success")
    assert breaker.state is CLOSED
    snapshot = breaker.snapshot()
    assert snapshot["calls_in_window"] == 0
    assert snapshot["consecutive_opens"] == 0
    assert breaker.acquire() is not None


def test_probe_failure_reopens_with_doubled_duration_capped(breaker: CircuitBreaker,
                                                            clock: FakeClock) -> None:
    half_open(breaker, clock)
    for expected in [30.0, 50.0, 50.0]:       # 15 * 2, 15 * 4 capped at 50, still 50
        call(breaker, "failure")
        assert breaker.state is OPEN
        assert breaker.snapshot()["open_until"] == pytest.approx(clock.now() + expected)
        clock.advance(expected - 0.5)
        assert breaker.acquire() is None
        clock.advance(0.5)
        assert breaker.state is HALF_OPEN


def test_open_duration_growth_resets_after_closing(breaker: CircuitBreaker,
                                                   clock: FakeClock) -> None:
    half_open(breaker, clock)
    call(breaker, "failure")                  # second open: 30 s
    clock.advance(30.0)
    call(breaker, "success")                  # closes
    trip(breaker)
    assert breaker.snapshot()["open_until"] == pytest.approx(clock.now() + CONFIG.open_s)


def test_ignored_probe_gives_its_slot_back(breaker: CircuitBreaker, clock: FakeClock) -> None:
    half_open(breaker, clock)
    probes = [breaker.acquire() for _ in range(CONFIG.half_open_probes)]
    assert breaker.acquire() is None
    probe = probes[0]
    assert probe is not None
    probe.ignore()                            # the client went away mid-probe
    probe.ignore()                            # settling twice must not free two slots
    assert breaker.state is HALF_OPEN
    assert breaker.acquire() is not None
    assert breaker.acquire() is None


# --- callbacks and snapshot ---------------------------------------------------------------------

def test_callbacks_get_each_transition_once(clock: FakeClock) -> None:
    first: list[Transition] = []
    second: list[Transition] = []
    breaker = CircuitBreaker("openai", CONFIG, clock, on_transition=[first.append, second.append])
    half_open(breaker, clock)
    breaker.state                             # reading again must not publish again
    call(breaker, "failure")
    clock.advance(30.0)
    call(breaker, "success")
    moves = [(t.old, t.new) for t in first]
    assert moves == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN),
                     (HALF_OPEN, CLOSED)]
    assert first == second
    assert all(t.provider == "openai" and t.reason for t in first)
    assert first[-1].at == clock.now()


def test_a_failing_callback_does_not_break_the_breaker(clock: FakeClock,
                                                       events: list[Transition]) -> None:
    def explode(_: Transition) -> None:
        raise RuntimeError("metrics down")

    breaker = CircuitBreaker("openai", CONFIG, clock, on_transition=[explode, events.append])
    trip(breaker)
    assert [(t.old, t.new) for t in events] == [(CLOSED, OPEN)]


def test_snapshot_fields(breaker: CircuitBreaker, clock: FakeClock) -> None:
    assert breaker.snapshot() == {"state": "closed", "failure_rate": 0.0, "calls_in_window": 0,
                                  "open_until": None, "consecutive_opens": 0}
    for outcome in ["success"] * 5 + ["failure"] * 5:
        call(breaker, outcome)
    assert breaker.snapshot() == {"state": "open", "failure_rate": 0.5, "calls_in_window": 10,
                                  "open_until": clock.now() + CONFIG.open_s, "consecutive_opens": 1}
    clock.advance(CONFIG.open_s)
    snapshot = breaker.snapshot()
    assert snapshot["state"] == "half_open"
    assert snapshot["open_until"] is None


def test_permit_is_a_plain_object_settled_in_finally(breaker: CircuitBreaker) -> None:
    permit = breaker.acquire()
    assert isinstance(permit, Permit)
    assert not hasattr(permit, "__del__")
    assert not permit.settled


# --- sliding window -----------------------------------------------------------------------------

def test_window_counts_and_slides_by_whole_seconds() -> None:
    window = SlidingWindow(3.0)
    window.record(True, 10.2)
    window.record(False, 10.9)
    window.record(False, 11.5)
    assert window.counts(12.99) == (3, 2)
    assert window.counts(13.0) == (1, 1)      # second 10 slid out
    assert window.counts(14.0) == (0, 0)
    assert window.failure_rate(14.0) == 0.0


def test_window_clear() -> None:
    window = SlidingWindow(30.0)
    window.record(False, 1.0)
    window.clear()
    assert window.counts(1.0) == (0, 0)


def test_window_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        SlidingWindow(0)
