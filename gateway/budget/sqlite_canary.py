"""The embedded store's canary records: one row per canary, its tallies as a JSON map of integer fields.

Times are kept in whole milliseconds, as on Redis. Each function runs inside a transaction of `SqliteBudgetStore`, on its worker thread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import orjson

from gateway.budget.canary_record import ArmTally, CanaryRecord, CanaryStatus, record_of, tally_fields
from gateway.budget.store import time_ms

__all__ = ["CANARY_SCHEMA", "sync_canary", "move_canary"]

CANARY_SCHEMA = """
CREATE TABLE IF NOT EXISTS canaries (
    canary TEXT PRIMARY KEY, step INTEGER NOT NULL, status TEXT NOT NULL, since REAL NOT NULL,
    tallies TEXT NOT NULL, expires_at REAL NOT NULL
);
"""


def sync_canary(db: sqlite3.Connection, canary: str, step: int, tallies: Sequence[ArmTally], now: float,
                expires_at: float) -> CanaryRecord:
    """Add the tallies of `step` when the canary ramps at it; the record after (see `BudgetStore.canary_sync`)."""
    db.execute("DELETE FROM canaries WHERE expires_at <= ?", (now,))
    row = db.execute("SELECT step, status, since, tallies FROM canaries WHERE canary = ?", (canary,)).fetchone()
    if row is None:
        row = (0, "ramping", time_ms(now) / 1000, "{}")
        db.execute("INSERT INTO canaries VALUES (?, ?, ?, ?, ?, ?)", (canary, *row, expires_at))
    at, status, since, text = row
    stored: dict[str, int] = orjson.loads(text)
    if at == step and status == "ramping" and tallies:
        for name, delta in tally_fields(tallies):
            stored[name] = stored.get(name, 0) + delta
    db.execute("UPDATE canaries SET tallies = ?, expires_at = ? WHERE canary = ?",
               (orjson.dumps(stored).decode(), expires_at, canary))
    return record_of(at, status, since, stored.items())


def move_canary(db: sqlite3.Connection, canary: str, from_step: int, to_step: int, status: CanaryStatus,
                now: float, expires_at: float) -> bool:
    """Move a canary ramping at `from_step` on (see `BudgetStore.canary_move`)."""
    moved = db.execute("UPDATE canaries SET step = ?, status = ?, since = ?, tallies = '{}', expires_at = ? "
                       "WHERE canary = ? AND step = ? AND status = 'ramping' AND expires_at > ?",
                       (to_step, status, time_ms(now) / 1000, expires_at, canary, from_step, now))
    return moved.rowcount == 1
