"""The embedded budget store: one SQLite file, for a single gateway process without Redis.

One connection lives on one dedicated worker thread; every operation is one `BEGIN IMMEDIATE`
transaction run there through `loop.run_in_executor`, so the event loop never blocks on disk and
operations are serialized. WAL mode with synchronous=NORMAL: a committed operation survives a
process crash (an OS crash may lose the last few). Rows past their `expires_at` are deleted lazily.
The ledger table keeps the newest `ledger_max_entries` rows: each insert deletes what falls behind.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, TypeVar

from gateway.budget.rate_windows import kind_of
from gateway.budget.sqlite_rates import (
    RATE_SCHEMA, add_rate, check_rate, close_rate, drop_expired_rates, rate_state, used_after,
)
from gateway.budget.store import (
    PLAIN, RESERVED, SWEEP_MAX, UNITS, BudgetStore, CounterKey, CounterState, LedgerEntry, OperationObserver,
    ReserveLine, ReserveOutcome, Unit, check_record_lines, check_reserve_lines, check_spare_ids, check_spend,
    time_ms,
)
from gateway.errors import StoreError
from gateway.pricing import Charge

__all__ = ["SqliteBudgetStore"]

T = TypeVar("T")
Db = sqlite3.Connection
Spend = Sequence[tuple[CounterKey, Charge]]
SpendLines = Sequence[tuple[CounterKey, Charge, float]]
_NOTHING = Charge()

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
    usage_estimated INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS ledger_time ON ledger (time_ms);
CREATE TABLE IF NOT EXISTS alert_claims (
    key TEXT PRIMARY KEY, payload TEXT NOT NULL, lease_until REAL NOT NULL, delivered INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS alert_claims_lease ON alert_claims (delivered, lease_until);
"""

_LEDGER_COLUMNS = (
    "time_ms, request_id, caller, team, policies, model, provider, prompt_tokens, completion_tokens,"
    " cached_tokens, cost_nano, status, latency_ms, attempts, requested_model, usage_estimated"
)
# Ledger columns added after the first release, added to an older file when it is opened.
_ADDED_LEDGER_COLUMNS = (("requested_model", "TEXT"), ("usage_estimated", "INTEGER NOT NULL DEFAULT 0"))

_ADD = """
INSERT INTO counters (policy, period, window_id, reserved_usd, reserved_tokens, reserved_requests,
                      spent_usd, spent_tokens, spent_requests, expires_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (policy, period, window_id) DO UPDATE SET
    reserved_usd = reserved_usd + excluded.reserved_usd,
    reserved_tokens = reserved_tokens + excluded.reserved_tokens,
    reserved_requests = reserved_requests + excluded.reserved_requests,
    spent_usd = spent_usd + excluded.spent_usd,
    spent_tokens = spent_tokens + excluded.spent_tokens,
    spent_requests = spent_requests + excluded.spent_requests,
    expires_at = excluded.expires_at
"""


class _Line(NamedTuple):
    """One line of a stored reservation (or of recorded spend)."""

    counter: CounterKey
    amount: Charge
    expires_at: float


class SqliteBudgetStore:
    """BudgetStore in a SQLite file; same semantics as the Redis store (see `BudgetStore`).

    Its calls run one at a time on the worker thread, each sent when awaited, none timed by itself: the
    `PLAIN` capabilities.
    """

    capabilities = PLAIN

    def __init__(self, path: str, *, ledger_max_entries: int = 1_000_000) -> None:
        self._path = path
        self._ledger_max = ledger_max_entries
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
            lambda db: self._reserve(db, [request_id], lines, now, lease_until, 1, need_group))

    async def reserve_spares(self, spare_ids: Sequence[str], lines: Sequence[ReserveLine], now: float,
                             lease_until: float, room: int, needed_now: bool = True) -> ReserveOutcome:
        """`reserve` under each id, all or none, leaving room for `room` - 1 more."""
        check_spare_ids(spare_ids, lines)
        check_reserve_lines(lines)
        return await self._transaction(lambda db: self._reserve(db, spare_ids, lines, now, lease_until, room))

    async def settle(self, request_id: str, actual: Spend, now: float,
                     entry: LedgerEntry | None = None) -> list[CounterState] | None:
        """Turn the live reservation into `actual` spend; the counters' states after it."""
        check_spend(actual)
        return await self._transaction(lambda db: self._settle(db, request_id, actual, now, entry))

    async def release(self, request_id: str, now: float, entry: LedgerEntry | None = None) -> bool:
        """Drop the live reservation without spend."""
        return await self._transaction(lambda db: self._release(db, request_id, now, entry))

    async def record(self, request_id: str, lines: SpendLines, now: float,
                     entry: LedgerEntry | None = None) -> bool:
        """Add spend without a reservation, once per request id."""
        check_record_lines(lines)
        return await self._transaction(lambda db: self._record(db, request_id, lines, now, entry))

    async def read(self, counters: Sequence[CounterKey], now: float) -> list[CounterState]:
        """The state of each counter, in order."""
        return await self._transaction(lambda db: self._read(db, counters, now))

    async def ledger(self, since: float, until: float, limit: int) -> list[LedgerEntry]:
        """The oldest `limit` ledger rows with since <= time < until."""
        return await self._transaction(lambda db: self._ledger(db, since, until, limit))

    async def claim_alert(self, key: str, payload: str, now: float, lease_until: float, expires_at: float) -> bool:
        """Claim alert `key` until `lease_until`: the first claim, or one whose earlier lease ended undelivered."""
        return await self._transaction(lambda db: self._claim_alert(db, key, payload, now, lease_until, expires_at))

    async def alert_delivered(self, key: str, now: float) -> None:
        """Mark alert `key` delivered."""
        await self._transaction(lambda db: db.execute(
            "UPDATE alert_claims SET delivered = 1, payload = '' WHERE key = ?", (key,)))

    async def pending_alerts(self, now: float, limit: int) -> list[tuple[str, str]]:
        """Claimed, undelivered alerts whose lease ended, oldest lease first."""
        return await self._transaction(lambda db: self._pending_alerts(db, now, limit))

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

    # --- operations, each run inside one transaction on the worker thread ---

    def _reserve(
        self, db: Db, request_ids: Sequence[str], lines: Sequence[ReserveLine], now: float, lease_until: float,
        room: int, need_group: bool = False,
    ) -> ReserveOutcome:
        self._drop_expired(db, now)
        self._sweep_leases(db, now)
        for request_id in request_ids:
            if self._live_reservation(db, request_id, now) is not None:
                raise ValueError(f"request {request_id!r} already holds a reservation")
        uses: dict[int, tuple[int, int]] = {}
        refusal, dropped = self._check(db, lines, len(request_ids) + room - 1, now, need_group, uses)
        if refusal is not None:
            return refusal
        for line in lines:
            if line.group in dropped:
                continue
            if kind_of(line.counter) == "budget":
                self._add(db, line.counter, _times(line.amount, len(request_ids)), _NOTHING, line.expires_at)
            else:
                add_rate(db, line, len(request_ids))
            db.executemany(
                "INSERT INTO reservation_lines VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(request_id, *_key_columns(line.counter), *_amounts(line.amount), lease_until, line.expires_at)
                 for request_id in request_ids],
            )
        if uses or any(line.group for line in lines):
            return ReserveOutcome(True, used=used_after(lines, uses, len(request_ids)), skipped=tuple(sorted(dropped)))
        return RESERVED

    def _check(self, db: Db, lines: Sequence[ReserveLine], times: int, now: float, need_group: bool,
               uses: dict[int, tuple[int, int]]) -> tuple[ReserveOutcome | None, set[int]]:
        """The refusal of `times` x the lines (see reserve.lua), else None and the groups that do not fit."""
        busy, group_refusal = None, None
        dropped: set[int] = set()
        for index, line in enumerate(lines):
            if kind_of(line.counter) == "budget":
                refusal, held = _refusal(index, line, self._state(db, line.counter), times)
                busy = busy or held
            else:
                refusal = check_rate(db, index, line, times, now, uses)
            if refusal is not None and line.group == 0:
                return refusal, dropped
            if refusal is not None and line.group not in dropped:
                dropped.add(line.group)
                group_refusal = _sooner(group_refusal, refusal)
        groups = {line.group for line in lines if line.group}
        if need_group and groups and groups <= dropped:
            return group_refusal, dropped
        return busy, dropped

    def _settle(self, db: Db, request_id: str, actual: Spend, now: float,
                entry: LedgerEntry | None) -> list[CounterState] | None:
        lines = self._live_reservation(db, request_id, now)
        if lines is None:
            return None
        spend = dict(actual)
        if not spend.keys() <= {line.counter for line in lines}:
            raise ValueError(f"settle of {request_id!r} names a counter its reservation does not hold")
        self._close_reservation(db, request_id, lines, spend)
        self._append_row(db, entry)
        return [self._state(db, counter) for counter, _ in actual]

    def _release(self, db: Db, request_id: str, now: float, entry: LedgerEntry | None) -> bool:
        lines = self._live_reservation(db, request_id, now)
        if lines is None:
            return False
        self._close_reservation(db, request_id, lines, {})
        self._append_row(db, entry)
        return True

    def _record(self, db: Db, request_id: str, lines: SpendLines, now: float, entry: LedgerEntry | None) -> bool:
        self._drop_expired(db, now)
        if self._is_spent(db, request_id):
            return False
        live = self._live_reservation(db, request_id, now)
        if self._is_spent(db, request_id):
            return False  # the lease had ended: the reservation became this request's spend
        if live is not None:
            self._close_reservation(db, request_id, live, {})
        for counter, charge, expires_at in lines:
            if kind_of(counter) == "budget":      # rate windows and flights are not spend: past by now
                self._add(db, counter, _NOTHING, charge, expires_at)
        self._mark_spent(db, request_id, [_Line(*line) for line in lines])
        self._append_row(db, entry)
        return True

    def _read(self, db: Db, counters: Sequence[CounterKey], now: float) -> list[CounterState]:
        self._drop_expired(db, now)
        self._sweep_leases(db, now)
        return [self._state(db, counter) if kind_of(counter) == "budget" else CounterState(counter, *rate_state(db, counter))
                for counter in counters]

    def _ledger(self, db: Db, since: float, until: float, limit: int) -> list[LedgerEntry]:
        rows = db.execute(
            f"SELECT {_LEDGER_COLUMNS} FROM ledger WHERE time_ms >= ? AND time_ms < ? ORDER BY seq LIMIT ?",
            (time_ms(since), time_ms(until), limit),
        ).fetchall()
        return [_entry(row) for row in rows]

    def _claim_alert(self, db: Db, key: str, payload: str, now: float, lease_until: float,
                     expires_at: float) -> bool:
        db.execute("DELETE FROM alert_claims WHERE expires_at <= ?", (now,))
        row = db.execute("SELECT delivered, lease_until FROM alert_claims WHERE key = ?", (key,)).fetchone()
        if row is None:
            db.execute("INSERT INTO alert_claims VALUES (?, ?, ?, 0, ?)", (key, payload, lease_until, expires_at))
            return True
        delivered, held_until = row
        if delivered or held_until >= now:
            return False
        db.execute("UPDATE alert_claims SET lease_until = ? WHERE key = ?", (lease_until, key))
        return True

    def _pending_alerts(self, db: Db, now: float, limit: int) -> list[tuple[str, str]]:
        db.execute("DELETE FROM alert_claims WHERE expires_at <= ?", (now,))
        return db.execute("SELECT key, payload FROM alert_claims WHERE delivered = 0 AND lease_until < ?"
                          " ORDER BY lease_until LIMIT ?", (now, limit)).fetchall()

    # --- building blocks ---

    def _state(self, db: Db, counter: CounterKey) -> CounterState:
        row = db.execute(
            "SELECT spent_usd, spent_tokens, spent_requests, reserved_usd, reserved_tokens, reserved_requests"
            " FROM counters WHERE policy = ? AND period = ? AND window_id = ?",
            _key_columns(counter),
        ).fetchone() or (0,) * 6
        return CounterState(counter, Charge(*row[:3]), Charge(*row[3:]))

    def _add(self, db: Db, counter: CounterKey, reserved: Charge, spent: Charge, expires_at: float) -> None:
        """Add (signed) amounts to a counter's reserved and spent totals; its expiry becomes `expires_at`."""
        db.execute(_ADD, (*_key_columns(counter), *_amounts(reserved), *_amounts(spent), expires_at))

    def _reservation(self, db: Db, request_id: str) -> tuple[float, list[_Line]] | None:
        rows = db.execute(
            "SELECT policy, period, window_id, usd, tokens, requests, lease_until, expires_at"
            " FROM reservation_lines WHERE request_id = ?",
            (request_id,),
        ).fetchall()
        if not rows:
            return None
        lines = [_Line(CounterKey(*row[:3]), Charge(*row[3:6]), row[7]) for row in rows]
        return rows[0][6], lines

    def _live_reservation(self, db: Db, request_id: str, now: float) -> list[_Line] | None:
        """The reservation's lines while its lease runs; an ended one is turned into spend first."""
        found = self._reservation(db, request_id)
        if found is None:
            return None
        lease_until, lines = found
        if lease_until < now:
            self._expire_into_spend(db, request_id, lines, now)
            return None
        return lines

    def _expire_into_spend(self, db: Db, request_id: str, lines: list[_Line], now: float) -> None:
        self._close_reservation(db, request_id, lines, {line.counter: line.amount for line in lines})
        budget = [line for line in lines if kind_of(line.counter) == "budget"]
        if budget:
            self._mark_spent(db, request_id, budget)
            self._append_row(db, _expired_row(request_id, budget, now))

    def _sweep_leases(self, db: Db, now: float) -> None:
        """Turn up to SWEEP_MAX reservations whose lease ended into spend."""
        ended = db.execute(
            "SELECT request_id FROM reservation_lines WHERE lease_until < ?"
            " GROUP BY request_id ORDER BY MIN(lease_until) LIMIT ?",
            (now, SWEEP_MAX),
        ).fetchall()
        for (request_id,) in ended:
            found = self._reservation(db, request_id)
            if found is not None:
                self._expire_into_spend(db, request_id, found[1], now)

    def _close_reservation(
        self, db: Db, request_id: str, lines: list[_Line], spend: dict[CounterKey, Charge]
    ) -> None:
        """Remove a reservation: its amounts leave `reserved`; spend[counter] is added to `spent`."""
        for line in lines:
            spent = spend.get(line.counter, _NOTHING)
            if kind_of(line.counter) == "budget":
                self._add(db, line.counter, _negated(line.amount), spent, line.expires_at)
            else:
                close_rate(db, line.counter, line.amount, spent)
        db.execute("DELETE FROM reservation_lines WHERE request_id = ?", (request_id,))

    def _mark_spent(self, db: Db, request_id: str, lines: Sequence[_Line]) -> None:
        expires_at = max(line.expires_at for line in lines)
        db.execute("INSERT OR REPLACE INTO spent_ids VALUES (?, ?)", (request_id, expires_at))

    def _append_row(self, db: Db, entry: LedgerEntry | None) -> None:
        """File a ledger row at max(its time, the latest row's time); drop rows past the newest N."""
        if entry is None:
            return
        latest = db.execute("SELECT MAX(time_ms) FROM ledger").fetchone()[0] or 0
        cursor = db.execute(
            f"INSERT INTO ledger ({_LEDGER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (max(time_ms(entry.time), latest), entry.request_id, entry.caller, entry.team, ",".join(entry.policies),
             entry.model, entry.provider, entry.prompt_tokens, entry.completion_tokens, entry.cached_tokens,
             entry.cost_nano, entry.status, entry.latency_ms, entry.attempts, entry.requested_model,
             int(entry.usage_estimated)),
        )
        db.execute("DELETE FROM ledger WHERE seq <= ?", ((cursor.lastrowid or 0) - self._ledger_max,))

    def _is_spent(self, db: Db, request_id: str) -> bool:
        found = db.execute("SELECT 1 FROM spent_ids WHERE request_id = ?", (request_id,)).fetchone()
        return found is not None

    def _drop_expired(self, db: Db, now: float) -> None:
        """Delete counters and spent markers past their expiry, as Redis expires their keys."""
        db.execute("DELETE FROM counters WHERE expires_at < ?", (now,))
        db.execute("DELETE FROM spent_ids WHERE expires_at < ?", (now,))
        drop_expired_rates(db, now)

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
            conn.executescript(_SCHEMA + RATE_SCHEMA)
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


def _times(charge: Charge, count: int) -> Charge:
    return Charge(charge.usd_nano * count, charge.tokens * count, charge.requests * count)


def _refusal(index: int, line: ReserveLine, state: CounterState,
             times: int) -> tuple[ReserveOutcome | None, ReserveOutcome | None]:
    """Why `times` x a budget line's amount does not fit (see reserve.lua): (a unit whose amount alone does
    not fit beside the spend, the first unit that reservations in flight keep busy); None: it fits."""
    busy = None
    totals = zip(_amounts(line.amount), _amounts(state.spent), _amounts(state.reserved), line.limits)
    for unit, (amount, spent, reserved, limit) in zip(UNITS, totals):
        if limit is None:
            continue
        if amount > limit - spent:
            return ReserveOutcome(False, index, unit), None
        if busy is None and times * amount > limit - spent - reserved:
            busy = ReserveOutcome(False, index, unit, held=True)
    return None, busy


def _sooner(first: ReserveOutcome | None, other: ReserveOutcome) -> ReserveOutcome:
    """Of two group refusals, the one that may fit soonest (a wait of -1 never does)."""
    if first is None:
        return other
    mine, theirs = first.retry_after or 0, other.retry_after or 0
    return other if theirs >= 0 and (mine < 0 or theirs < mine) else first


def _expired_row(request_id: str, lines: Sequence[_Line], now: float) -> LedgerEntry:
    """The ledger row of a reservation whose lease ended: its policies and largest line amounts."""
    usd, tokens = max(line.amount.usd_nano for line in lines), max(line.amount.tokens for line in lines)
    policies = tuple(sorted({line.counter.policy for line in lines}))
    return LedgerEntry(now, request_id, None, None, policies, None, None, tokens, 0, 0, usd, "lease_expired", 0, 0)


def _entry(row: tuple) -> LedgerEntry:
    """A ledger row read back."""
    time_ms_, request_id, caller, team, policies, *rest, estimated = row
    return LedgerEntry._make((time_ms_ / 1000, request_id, caller, team, tuple(filter(None, policies.split(","))),
                              *rest, bool(estimated)))


def _key_columns(counter: CounterKey) -> tuple[str, str, str]:
    return counter.policy, counter.period, counter.window_id


def _amounts(charge: Charge) -> tuple[int, int, int]:
    return charge.usd_nano, charge.tokens, charge.requests


def _negated(charge: Charge) -> Charge:
    return Charge(-charge.usd_nano, -charge.tokens, -charge.requests)


_: type[BudgetStore] = SqliteBudgetStore   # mypy proves the store keeps the contract
