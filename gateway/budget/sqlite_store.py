"""The embedded budget store: one SQLite file, for a single gateway process without Redis.

One connection lives on one dedicated worker thread; every operation (see sqlite_tables) is one
`BEGIN IMMEDIATE` transaction run there through `loop.run_in_executor`, so the event loop never blocks
on disk and operations are serialized. WAL mode with synchronous=NORMAL: a committed operation survives a
process crash (an OS crash may lose the last few). Rows past their `expires_at` are deleted lazily.
The ledger table keeps the newest `ledger_max_entries` rows: each insert deletes what falls behind.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from gateway.budget.canary_record import ArmTally, CanaryRecord, CanaryStatus, check_canary_move
from gateway.budget.sqlite_canary import CANARY_SCHEMA, move_canary, sync_canary
from gateway.budget.sqlite_rates import RATE_SCHEMA
from gateway.budget.sqlite_tables import Db, Spend, SpendLines, SqliteTables
from gateway.budget.store import (
    PLAIN, RESERVED, BudgetStore, CounterKey, CounterState, LedgerEntry, OperationObserver, ReserveLine,
    ReserveOutcome, check_record_lines, check_reserve_lines, check_spare_ids, check_spend,
)
from gateway.errors import StoreError

__all__ = ["SqliteBudgetStore"]

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (
    policy TEXT NOT NULL, period TEXT NOT NULL, window_id TEXT NOT NULL,
    spent_usd INTEGER NOT NULL DEFAULT 0, spent_tokens INTEGER NOT NULL DEFAULT 0,
    spent_requests INTEGER NOT NULL DEFAULT 0, reserved_usd INTEGER NOT NULL DEFAULT 0,
    reserved_tokens INTEGER NOT NULL DEFAULT 0, reserved_requests INTEGER NOT NULL DEFAULT 0,
    expires_at REAL NOT NULL,
    PRIMARY KEY (policy, period, window_id)
);
CREATE INDEX IF NOT EXISTS counters_expiry ON counters (expires_at);
CREATE TABLE IF NOT EXISTS reservation_lines (
    request_id TEXT NOT NULL, policy TEXT NOT NULL, period TEXT NOT NULL, window_id TEXT NOT NULL,
    usd INTEGER NOT NULL, tokens INTEGER NOT NULL, requests INTEGER NOT NULL,
    lease_until REAL NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (request_id, policy, period, window_id)
);
CREATE INDEX IF NOT EXISTS reservation_lease ON reservation_lines (lease_until);
CREATE TABLE IF NOT EXISTS spent_ids (
    request_id TEXT PRIMARY KEY, expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS spent_ids_expiry ON spent_ids (expires_at);
CREATE TABLE IF NOT EXISTS ledger (
    seq INTEGER PRIMARY KEY, time_ms INTEGER NOT NULL, request_id TEXT NOT NULL, caller TEXT, team TEXT,
    policies TEXT NOT NULL, model TEXT, provider TEXT, prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL, cached_tokens INTEGER NOT NULL, cost_nano INTEGER NOT NULL,
    status TEXT NOT NULL, latency_ms INTEGER NOT NULL, attempts INTEGER NOT NULL, requested_model TEXT,
    usage_estimated INTEGER NOT NULL DEFAULT 0, saved_nano INTEGER NOT NULL DEFAULT 0, endpoint TEXT,
    cache_write_tokens INTEGER NOT NULL DEFAULT 0, end_user TEXT, session TEXT
);
CREATE INDEX IF NOT EXISTS ledger_time ON ledger (time_ms);
CREATE TABLE IF NOT EXISTS alert_claims (
    key TEXT PRIMARY KEY, payload TEXT NOT NULL, lease_until REAL NOT NULL, delivered INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS alert_claims_lease ON alert_claims (delivered, lease_until);
"""

# Ledger columns added after the first release, added to an older file when it is opened.
_ADDED_LEDGER_COLUMNS = (("requested_model", "TEXT"), ("usage_estimated", "INTEGER NOT NULL DEFAULT 0"),
                         ("saved_nano", "INTEGER NOT NULL DEFAULT 0"), ("endpoint", "TEXT"),
                         ("cache_write_tokens", "INTEGER NOT NULL DEFAULT 0"), ("end_user", "TEXT"), ("session", "TEXT"))


class SqliteBudgetStore:
    """BudgetStore in a SQLite file; same semantics as the Redis store (see `BudgetStore`).

    Its calls run one at a time on the worker thread, each sent when awaited, none timed by itself: the
    `PLAIN` capabilities.
    """

    capabilities = PLAIN

    def __init__(self, path: str, *, ledger_max_entries: int = 1_000_000) -> None:
        self._path = path
        self._tables = SqliteTables(ledger_max_entries)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="budget-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._closed = False

    async def reserve(
        self, request_id: str, lines: Sequence[ReserveLine], now: float, lease_until: float,
        need_group: bool = False,
    ) -> ReserveOutcome:
        """Reserve every line or none."""
        check_reserve_lines(lines)
        if not lines:
            return RESERVED
        return await self._transaction(
            lambda db: self._tables.reserve(db, [request_id], lines, now, lease_until, 1, need_group))

    async def reserve_spares(self, spare_ids: Sequence[str], lines: Sequence[ReserveLine], now: float,
                             lease_until: float, room: int, needed_now: bool = True) -> ReserveOutcome:
        """`reserve` under each id, all or none, leaving room for `room` - 1 more."""
        check_spare_ids(spare_ids, lines)
        check_reserve_lines(lines)
        return await self._transaction(lambda db: self._tables.reserve(db, spare_ids, lines, now, lease_until, room))

    async def settle(self, request_id: str, actual: Spend, now: float,
                     entry: LedgerEntry | None = None) -> list[CounterState] | None:
        """Turn the live reservation into `actual` spend; the counters' states after it."""
        check_spend(actual)
        return await self._transaction(lambda db: self._tables.settle(db, request_id, actual, now, entry))

    async def release(self, request_id: str, now: float, entry: LedgerEntry | None = None) -> bool:
        """Drop the live reservation without spend."""
        return await self._transaction(lambda db: self._tables.release(db, request_id, now, entry))

    async def record(self, request_id: str, lines: SpendLines, now: float,
                     entry: LedgerEntry | None = None) -> bool:
        """Add spend without a reservation, once per request id."""
        check_record_lines(lines)
        return await self._transaction(lambda db: self._tables.record(db, request_id, lines, now, entry))

    async def file_rows(self, entries: Sequence[LedgerEntry]) -> None:
        """Add ledger rows that move no counter (see `BudgetStore`), in one transaction."""
        await self._transaction(lambda db: self._tables.file_rows(db, entries))

    async def read(self, counters: Sequence[CounterKey], now: float) -> list[CounterState]:
        """The state of each counter, in order."""
        return await self._transaction(lambda db: self._tables.read(db, counters, now))

    async def ledger(self, since: float, until: float, limit: int) -> list[LedgerEntry]:
        """The oldest `limit` ledger rows with since <= time < until."""
        return await self._transaction(lambda db: self._tables.ledger(db, since, until, limit))

    async def claim_alert(self, key: str, payload: str, now: float, lease_until: float, expires_at: float) -> bool:
        """Claim alert `key` until `lease_until`: the first claim, or one whose earlier lease ended undelivered."""
        return await self._transaction(
            lambda db: self._tables.claim_alert(db, key, payload, now, lease_until, expires_at))

    async def alert_delivered(self, key: str, now: float) -> None:
        """Mark alert `key` delivered."""
        await self._transaction(lambda db: db.execute(
            "UPDATE alert_claims SET delivered = 1, payload = '' WHERE key = ?", (key,)))

    async def pending_alerts(self, now: float, limit: int) -> list[tuple[str, str]]:
        """Claimed, undelivered alerts whose lease ended, oldest lease first."""
        return await self._transaction(lambda db: self._tables.pending_alerts(db, now, limit))

    async def canary_sync(self, canary: str, step: int, tallies: Sequence[ArmTally], now: float,
                          expires_at: float) -> CanaryRecord:
        """Add the tallies of `step` and read the canary back."""
        return await self._transaction(lambda db: sync_canary(db, canary, step, tallies, now, expires_at))

    async def canary_move(self, canary: str, from_step: int, to_step: int, status: CanaryStatus, now: float,
                          expires_at: float) -> bool:
        """Move the canary on by compare-and-set on its step."""
        check_canary_move(from_step, to_step, status)
        return await self._transaction(
            lambda db: move_canary(db, canary, from_step, to_step, status, now, expires_at))

    async def ping(self) -> bool:
        """True when the database answers a query."""
        try:
            await self._transaction(lambda db: db.execute("SELECT 1").fetchone())
        except StoreError:
            return False
        return True

    def flush(self) -> None:
        """Nothing is held back: every call is sent when it is awaited."""

    def observe_calls(self, observe: OperationObserver) -> None:
        """No operation times itself here (an InstrumentedStore times them)."""

    async def close(self) -> None:
        """Close the connection and stop the worker thread; closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close_connection)
        self._executor.shutdown(wait=False)

    # --- the worker thread ---

    async def _transaction(self, operation: Callable[[Db], T]) -> T:
        """Run `operation` in one BEGIN IMMEDIATE transaction on the worker thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run_transaction, operation)

    def _run_transaction(self, operation: Callable[[Db], T]) -> T:
        try:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                result = operation(db)
            except BaseException:
                db.rollback()
                raise
            db.commit()
            return result
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite budget store {self._path!r} failed: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        """The worker thread's connection, opened (and the schema created) on first use."""
        if self._conn is None:
            conn = sqlite3.connect(self._path, isolation_level=None, timeout=5.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA + RATE_SCHEMA + CANARY_SCHEMA)
            _migrate_alerts(conn)
            _add_missing_columns(conn)
            self._conn = conn
        return self._conn

    def _close_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _migrate_alerts(conn: sqlite3.Connection) -> None:
    """Carry the `alerts` table of an earlier release over as delivered claims (each was announced)."""
    conn.execute("BEGIN IMMEDIATE")   # several workers may open one file at once: one migrates
    try:
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'alerts'").fetchone():
            conn.execute("INSERT OR IGNORE INTO alert_claims SELECT key, '', 0, 1, expires_at FROM alerts")
            conn.execute("DROP TABLE alerts")
        conn.execute("COMMIT")
    except BaseException:
        conn.rollback()
        raise


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """Bring the ledger table of a file written by an earlier build up to date (its rows read the defaults)."""
    present = {row[1] for row in conn.execute("PRAGMA table_info(ledger)")}
    for name, declaration in _ADDED_LEDGER_COLUMNS:
        if name not in present:
            conn.execute(f"ALTER TABLE ledger ADD COLUMN {name} {declaration}")


_: type[BudgetStore] = SqliteBudgetStore   # mypy proves the store keeps the contract
