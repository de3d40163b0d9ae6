"""Each configured canary on this replica: the step it routes by, what its requests did, and the sync that
shares both with every other replica through the store.

The request path never calls the store. A request takes the arm its run's cached step gives it and, when
answered, adds its outcome to the run's pending tally (in memory). Every SYNC_INTERVAL_S a background task
(`sync`) sends each run's pending tally with the step it was counted under and reads the shared record back
in the same store operation (`canary_sync`); it asks `decide` for a move, makes it by compare-and-set
(`canary_move`: of replicas deciding at once, one moves it), and adopts the record read.

So the store holds the one step every replica reads (status, metrics and `gateway status` read it there);
a replica routes by what it read at most SYNC_INTERVAL_S (plus one store round trip) ago. A tally counted
under an earlier step is dropped, in the store or here, never added to the next step. A restarted replica
reads the step at start-up before it serves; until its first read a canary sends every request to control.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gateway.budget.canary_record import RAMPING, ROLLED_BACK, ArmTally, CanaryRecord
from gateway.budget.store import BudgetStore
from gateway.clock import Clock
from gateway.config.model import Settings
from gateway.config.routes import Route
from gateway.errors import StoreError
from gateway.domain.plan import Plan
from gateway.routing.canary import Move, decide, percent
from gateway.routing.latency import bucket_of
from gateway.routing.router import CANDIDATE, CONTROL, RouteChoice, arm_plans

__all__ = ["CanaryRun", "CanaryRuns", "SYNC_INTERVAL_S", "RECORD_TTL_S", "Rollback"]

log = logging.getLogger("gateway.canary")
SYNC_INTERVAL_S = 1.0
RECORD_TTL_S = 30 * 86_400.0   # a canary nobody syncs any more (its config changed) is forgotten after this


@dataclass
class _Pending:
    """One arm's outcomes not yet sent to the store."""

    requests: int = 0
    errors: int = 0
    cost_nano: int = 0
    latency: dict[int, int] = field(default_factory=dict)

    def tally(self) -> ArmTally:
        """These outcomes as a tally for the store."""
        return ArmTally(self.requests, self.errors, self.cost_nano, tuple(sorted(self.latency.items())))


class CanaryRun:
    """One canary on this replica: its config, the record last read, its choices and its pending tally."""

    def __init__(self, route: Route, plans: Sequence[Plan]) -> None:
        assert route.canary is not None
        self.route, self.config = route.pattern, route.canary
        self.id = f"{route.pattern}:{route.canary.digest}"
        self.record: CanaryRecord | None = None          # None until first read: every request to control
        self.step, self.percent = -1, 0
        self._plans = (plans[0], plans[1])
        self.choices = self._choices()
        self._pending = (_Pending(), _Pending())

    def use(self, plans: Sequence[Plan]) -> None:
        """Serve with these arm plans from now on (a reload may have changed a price)."""
        self._plans = (plans[0], plans[1])
        self.choices = self._choices()

    def _choices(self) -> tuple[RouteChoice, RouteChoice]:
        return (RouteChoice(self._plans[0], CONTROL, self, 0, self.step),
                RouteChoice(self._plans[1], CANDIDATE, self, 1, self.step))

    def observe(self, choice: RouteChoice, served_by: str | None, cost_nano: int | None, latency_s: float) -> None:
        """Tally one answered request of `choice`'s arm: failed unless that arm's provider served it."""
        if choice.step != self.step or self.step < 0:
            return                                       # chosen under an earlier step: not this step's
        pending = self._pending[choice.arm_index]
        pending.requests += 1
        if served_by != choice.plan.targets[0].provider:
            pending.errors += 1
            return
        pending.cost_nano += cost_nano or 0
        bucket = bucket_of(latency_s)
        pending.latency[bucket] = pending.latency.get(bucket, 0) + 1

    def take(self) -> tuple[int, tuple[ArmTally, ArmTally]]:
        """The pending tallies and the step they were counted under; the run starts counting afresh."""
        pending, self._pending = self._pending, (_Pending(), _Pending())
        return self.step, (pending[0].tally(), pending[1].tally())

    def adopt(self, record: CanaryRecord) -> None:
        """Route by `record` from now on."""
        self.record = record
        step = record.step if record.status == RAMPING else -1   # a final state tallies nothing
        if step != self.step:
            self.step = step
            self.choices = self._choices()
            self._pending = (_Pending(), _Pending())
        self.percent = percent(self.config, record)


Rollback = Callable[[CanaryRun, Move, float], None]
"""Told once, on the replica that made it, when a canary is rolled back: (run, move, now)."""


class CanaryRuns:
    """The canaries of the active config on this replica, synced with the store in the background."""

    def __init__(self, store: BudgetStore | None, clock: Clock) -> None:
        self.store, self.clock = store, clock
        self.on_rollback: list[Rollback] = []
        self._runs: dict[str, CanaryRun] = {}

    def run_for(self, route: Route, plans: Sequence[Plan]) -> CanaryRun:
        """The run of a canary route: the same one while the canary's config stands (reloads keep it)."""
        assert route.canary is not None
        key = f"{route.pattern}:{route.canary.digest}"
        run = self._runs.get(key)
        if run is None:
            run = self._runs[key] = CanaryRun(route, plans)
        else:
            run.use(plans)
        return run

    def runs(self, settings: Settings) -> list[CanaryRun]:
        """The runs of every canary route of `settings`, made when first seen; runs of others are dropped."""
        wanted = {}
        for route in settings.routes:
            if route.canary is not None:
                key = f"{route.pattern}:{route.canary.digest}"
                wanted[key] = self._runs.get(key) or CanaryRun(route, arm_plans(settings, route.pattern))
        self._runs = wanted
        return list(wanted.values())

    async def sync(self, settings: Settings) -> None:
        """One turn: every run's tally sent, its record read, a move made where one is due (no store: none)."""
        if self.store is None:
            return
        for run in self.runs(settings):
            try:
                await self.sync_run(run)
            except StoreError as exc:
                log.warning("canary '%s' not synced with the store (%s); it routes by the step last read",
                            run.route, exc)

    async def sync_run(self, run: CanaryRun) -> CanaryRecord:
        """Send `run`'s tally, read its record, make the move due (if this replica wins it), adopt the result."""
        assert self.store is not None
        step, tallies = run.take()
        now = self.clock.now()
        record = await self.store.canary_sync(run.id, step, tallies if step >= 0 else (), now, now + RECORD_TTL_S)
        move = decide(run.config, record, now)
        if move is not None and await self.store.canary_move(run.id, record.step, move.to_step, move.status, now,
                                                              now + RECORD_TTL_S):
            self._moved(run, record, move, now)
            record = await self.store.canary_sync(run.id, move.to_step, (), now, now + RECORD_TTL_S)
        run.adopt(record)
        return record

    def _moved(self, run: CanaryRun, record: CanaryRecord, move: Move, now: float) -> None:
        """Log a move this replica made; tell the rollback listeners of a rollback."""
        steps = run.config.steps
        log.warning("canary '%s' %s: %s -> %s (%s)", run.route, move.status, f"{steps[record.step]}%",
                    "0%" if move.status == ROLLED_BACK else f"{steps[move.to_step]}%", move.reason)
        if move.status == ROLLED_BACK:
            for listener in self.on_rollback:
                listener(run, move, now)

    async def read(self, settings: Settings) -> list[tuple[CanaryRun, CanaryRecord]]:
        """Every canary's record as the store holds it now (what status and metrics show); none without a store."""
        if self.store is None:
            return []
        now = self.clock.now()
        return [(run, await self.store.canary_sync(run.id, -1, (), now, now + RECORD_TTL_S))
                for run in self.runs(settings)]


def latency_of(started: float, first_byte_s: float | None) -> float:
    """A request's latency for its arm: to its first streamed event, else to its whole answer."""
    return first_byte_s if first_byte_s is not None else time.perf_counter() - started
