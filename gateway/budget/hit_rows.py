"""Ledger rows of cache hits, filed together: the hits served in one turn of the event loop make one store
call, not one each (a hit makes no other store call, so its row would be the most of what it costs)."""

from __future__ import annotations

import contextlib

from gateway.budget.store import LedgerEntry
from gateway.budget.store_calls import StoreCalls
from gateway.errors import StoreError

__all__ = ["HitRows"]


class HitRows:
    """Rows waiting to be filed; lost, not journaled, if the store fails (they move no counter)."""

    def __init__(self, calls: StoreCalls) -> None:
        self._calls = calls
        self._pending: list[LedgerEntry] = []

    def add(self, entry: LedgerEntry) -> None:
        """File `entry` with the other rows added before the filing task runs (`settled` waits for it)."""
        if not self._pending:
            self._calls.spawn(self._file())
        self._pending.append(entry)

    async def _file(self) -> None:
        rows, self._pending = self._pending, []
        assert self._calls.store is not None
        with contextlib.suppress(StoreError, TimeoutError):
            await self._calls.bounded(self._calls.store.file_rows(rows))
