"""Store outages: when to stop asking the store, the fail-open allowance, the journal and recovery.

One failed call is not an outage (a fork for BGSAVE can slow one): after a few in a row, requests skip the
store until the replayer sees it answer again. Meanwhile `fail_closed` answers 503 and `fail_open`
serves within this replica's share of every limit (`LocalAllowance`). Spend the store could not take goes
to the durable journal with its ledger row, and is replayed when the store is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from gateway.budget.allowance import LocalAllowance
from gateway.budget.journal import Replay, SpendJournal
from gateway.budget.store import LedgerEntry, ReserveLine, ReserveOutcome
from gateway.budget.store_calls import StoreCalls
from gateway.clock import Clock
from gateway.config.model import StoreConfig
from gateway.domain.pricing import Charge
from gateway.errors import StoreError, StoreUnavailable

__all__ = ["Outage", "RETRY_STORE_AFTER_S", "FAILURES_BEFORE_SKIPPING_STORE"]

log = logging.getLogger("gateway.budget")
RETRY_STORE_AFTER_S = 1.0   # after repeated store errors, requests skip the store this long (the replayer probes)
FAILURES_BEFORE_SKIPPING_STORE = 3   # one slow call (a fork for BGSAVE) is not an outage


class Outage:
    """Counts store failures, answers for the store while it is down, journals what it could not take."""

    def __init__(self, calls: StoreCalls, clock: Clock, config: StoreConfig, journal: SpendJournal | None) -> None:
        self._calls = calls
        self._clock = clock
        self._fail_open = config.on_outage == "fail_open"
        self._on_outage = config.on_outage
        self.journal = journal
        self.allowance = LocalAllowance(float(config.fail_open_allowance))
        self.down_until = 0.0        # monotonic: requests skip the store until then
        self.failures = 0            # in a row

    async def reserve(self, request_id: str, lines: Sequence[ReserveLine], now: float,
                      need_group: bool = False) -> ReserveOutcome | None:
        """The store's answer, or None when the request is admitted on the local fail-open allowance."""
        if self._clock.monotonic() >= self.down_until:
            calls = self._calls
            try:
                outcome = await calls.reserve(request_id, lines, now, need_group)
                self.failures = 0
                return outcome
            except asyncio.CancelledError:
                calls.client_left(request_id, now)
                raise
            except (StoreError, TimeoutError) as exc:
                self.mark_down(exc)
                calls.release_later(request_id, now)   # the store may have applied it before the reply was lost
        if self._fail_open and self.allowance.try_take(lines):
            return None
        raise StoreUnavailable("The budget store is unreachable, so the gateway cannot check this request's "
                               "budget; try again shortly.", headers={"Retry-After": "1"})

    def mark_down(self, exc: BaseException) -> None:
        """Count a store failure; after a few in a row, requests skip the store until the replayer sees it back."""
        self.failures += 1
        if self.failures == FAILURES_BEFORE_SKIPPING_STORE:
            log.warning("budget store unreachable (%s); mode %s", exc, self._on_outage)
        if self.failures >= FAILURES_BEFORE_SKIPPING_STORE:
            self.down_until = self._clock.monotonic() + RETRY_STORE_AFTER_S

    async def store_failed(self, exc: BaseException, held_as: str, lines: Sequence[ReserveLine],
                           charge: Charge | None, entry: LedgerEntry) -> None:
        """A settlement the store failed: count the failure, journal it to be settled (or released) again."""
        self.mark_down(exc)
        await self.append_journal(held_as, lines, charge or Charge(), entry, "release" if charge is None else "settle")

    async def settle_locally(self, request_id: str, lines: Sequence[ReserveLine], charge: Charge | None,
                             entry: LedgerEntry) -> None:
        """A request admitted on the fail-open allowance: adjust the allowance, journal the spend to record."""
        self.allowance.adjust(lines, charge)
        await self.append_journal(request_id, lines, charge or Charge(), entry, "record")

    async def append_journal(self, held_as: str, lines: Sequence[ReserveLine], spent: Charge,
                             entry: LedgerEntry | None, replay: Replay) -> None:
        """Journal `spent` on each line's counter under the store's id for it (an error log without a journal).

        A reservation held in the store is settled or released again on replay (a no-op if the first try
        did reach the store); one held locally is recorded; a release is journaled as zero spend.
        """
        if self.journal is None:
            log.error("budget store unreachable and no journal configured: %s not settled", held_as)
            return
        spend = [(line.counter, spent, line.expires_at) for line in lines]
        # fsync off the loop
        await asyncio.to_thread(self.journal.append, held_as, spend, entry, replay)

    async def recover(self) -> bool:
        """Replay the journal when the store answers again; True when the store is healthy."""
        store = self._calls.store
        if store is None:
            return True
        try:
            async with asyncio.timeout(self._calls.hard_timeout_s):
                healthy = await store.ping()
            if healthy and self.journal is not None and self.journal.has_entries():
                replayed = await self.journal.replay(store, self._clock.now())
                log.info("budget store is back: replayed %d journaled requests", replayed)
        except (StoreError, TimeoutError) as exc:
            self.mark_down(exc)
            return False
        if healthy:
            self.down_until = 0.0
            self.failures = 0
            self.allowance.clear()
        return healthy

    async def ping(self) -> bool:
        """True when the store answers (always, without a store)."""
        store = self._calls.store
        if store is None:
            return True
        try:
            async with asyncio.timeout(self._calls.hard_timeout_s):
                return await store.ping()
        except (StoreError, TimeoutError):
            return False
