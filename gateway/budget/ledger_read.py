"""Reading the spend ledger over a time range, page by page (the usage report and the burn rates read it)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from gateway.budget.store import BudgetStore, LedgerEntry

__all__ = ["PAGE", "ledger_rows"]

log = logging.getLogger("gateway.budget")
PAGE = 10_000


async def ledger_rows(store: BudgetStore, since: float, until: float, page: int = PAGE) -> AsyncIterator[LedgerEntry]:
    """Every ledger row with since <= time < until, read page by page; rows sharing a time are read once."""
    read_at_edge: set[str] = set()
    while True:
        rows = await store.ledger(since, until, page)
        fresh = [row for row in rows if row.request_id not in read_at_edge]
        for row in fresh:
            yield row
        if len(rows) < page:
            return
        if not fresh:
            log.warning("usage report cut short: more than %d ledger rows share the time %s", page, since)
            return
        last = rows[-1].time
        at_last = {row.request_id for row in rows if row.time == last}
        read_at_edge = at_last | read_at_edge if last == since else at_last
        since = last
