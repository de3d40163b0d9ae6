"""The SQLite budget store's operations on its tables, each run inside one transaction (see sqlite_store)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import NamedTuple

from gateway.budget.rate_windows import kind_of
from gateway.budget.sqlite_rates import add_rate, check_rate, close_rate, drop_expired_rates, rate_state, used_after
from gateway.budget.store import (
    RESERVED, SWEEP_MAX, UNITS, CounterKey, CounterState, LedgerEntry, ReserveLine, ReserveOutcome, time_ms,
)
from gateway.domain.pricing import Charge

__all__ = ["SqliteTables", "LEDGER_COLUMNS", "Db", "Spend", "SpendLines"]

Db = sqlite3.Connection
Spend = Sequence[tuple[CounterKey, Charge]]
SpendLines = Sequence[tuple[CounterKey, Charge, float]]
_NOTHING = Charge()

LEDGER_COLUMNS = (
    "time_ms, request_id, caller, team, policies, model, provider, prompt_tokens, completion_tokens,"
    " cached_tokens, cost_nano, status, latency_ms, attempts, requested_model, usage_estimated, saved_nano,"
    " endpoint, cache_write_tokens, end_user, session"
)

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


class SqliteTables:
    """Counters, reservation lines, spent ids, the ledger and alert claims: the store's rules in SQL."""

    def __init__(self, ledger_max_entries: int) -> None:
        self.ledger_max = ledger_max_entries

    def reserve(
        self, db: Db, request_ids: Sequence[str], lines: Sequence[ReserveLine], now: float, lease_until: float,
        room: int, need_group: bool = False,
    ) -> ReserveOutcome:
        self._drop_expired(db, now)
        self._sweep_leases(db, now)
        for request_id in request_ids:
            if self._live_reservation(db, request_id, now) is not None:
                raise ValueError(f"request {request_id!r} already holds a reservation")
        uses: dict[int, tuple[int, int]] = {}
        refusal, dropped = _check(db, lines, len(request_ids) + room - 1, now, need_group, uses)
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

    def settle(self, db: Db, request_id: str, actual: Spend, now: float,
                entry: LedgerEntry | None) -> list[CounterState] | None:
        lines = self._live_reservation(db, request_id, now)
        if lines is None:
            return None
        spend = dict(actual)
        if not spend.keys() <= {line.counter for line in lines}:
            raise ValueError(f"settle of {request_id!r} names a counter its reservation does not hold")
        self._close_reservation(db, request_id, lines, spend)
        self._append_row(db, entry)
        return [_state(db, counter) for counter, _ in actual]

    def release(self, db: Db, request_id: str, now: float, entry: LedgerEntry | None) -> bool:
        lines = self._live_reservation(db, request_id, now)
        if lines is None:
            return False
        self._close_reservation(db, request_id, lines, {})
        self._append_row(db, entry)
        return True

    def record(self, db: Db, request_id: str, lines: SpendLines, now: float, entry: LedgerEntry | None) -> bool:
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

    def file_rows(self, db: Db, entries: Sequence[LedgerEntry]) -> None:
        for entry in entries:
            self._append_row(db, entry)

    def read(self, db: Db, counters: Sequence[CounterKey], now: float) -> list[CounterState]:
        self._drop_expired(db, now)
        self._sweep_leases(db, now)
        return [_state(db, counter) if kind_of(counter) == "budget"
                else CounterState(counter, *rate_state(db, counter)) for counter in counters]

    def ledger(self, db: Db, since: float, until: float, limit: int) -> list[LedgerEntry]:
        rows = db.execute(
            f"SELECT {LEDGER_COLUMNS} FROM ledger WHERE time_ms >= ? AND time_ms < ? ORDER BY seq LIMIT ?",
            (time_ms(since), time_ms(until), limit),
        ).fetchall()
        return [_entry(row) for row in rows]

    def claim_alert(self, db: Db, key: str, payload: str, now: float, lease_until: float,
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

    def pending_alerts(self, db: Db, now: float, limit: int) -> list[tuple[str, str]]:
        db.execute("DELETE FROM alert_claims WHERE expires_at <= ?", (now,))
        return db.execute("SELECT key, payload FROM alert_claims WHERE delivered = 0 AND lease_until < ?"
                          " ORDER BY lease_until LIMIT ?", (now, limit)).fetchall()

    # --- building blocks ---

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
            f"INSERT INTO ledger ({LEDGER_COLUMNS}) VALUES ({', '.join('?' * 21)})",
            (max(time_ms(entry.time), latest), entry.request_id, entry.caller, entry.team, ",".join(entry.policies),
             entry.model, entry.provider, entry.prompt_tokens, entry.completion_tokens, entry.cached_tokens,
             entry.cost_nano, entry.status, entry.latency_ms, entry.attempts, entry.requested_model,
             int(entry.usage_estimated), entry.saved_nano, entry.endpoint, entry.cache_write_tokens, entry.user,
             entry.session),
        )
        db.execute("DELETE FROM ledger WHERE seq <= ?", ((cursor.lastrowid or 0) - self.ledger_max,))

    def _is_spent(self, db: Db, request_id: str) -> bool:
        found = db.execute("SELECT 1 FROM spent_ids WHERE request_id = ?", (request_id,)).fetchone()
        return found is not None

    def _drop_expired(self, db: Db, now: float) -> None:
        """Delete counters and spent markers past their expiry, as Redis expires their keys."""
        db.execute("DELETE FROM counters WHERE expires_at < ?", (now,))
        db.execute("DELETE FROM spent_ids WHERE expires_at < ?", (now,))
        drop_expired_rates(db, now)


def _check(db: Db, lines: Sequence[ReserveLine], times: int, now: float, need_group: bool,
           uses: dict[int, tuple[int, int]]) -> tuple[ReserveOutcome | None, set[int]]:
    """The refusal of `times` x the lines (see reserve.lua), else None and the groups that do not fit."""
    busy, group_refusal = None, None
    dropped: set[int] = set()
    for index, line in enumerate(lines):
        if kind_of(line.counter) == "budget":
            refusal, held = _refusal(index, line, _state(db, line.counter), times)
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


def _state(db: Db, counter: CounterKey) -> CounterState:
    row = db.execute(
        "SELECT spent_usd, spent_tokens, spent_requests, reserved_usd, reserved_tokens, reserved_requests"
        " FROM counters WHERE policy = ? AND period = ? AND window_id = ?",
        _key_columns(counter),
    ).fetchone() or (0,) * 6
    return CounterState(counter, Charge(*row[:3]), Charge(*row[3:]))


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
    time_ms_, request_id, caller, team, policies, *rest, estimated, saved, endpoint, written, user, session = row
    return LedgerEntry._make((time_ms_ / 1000, request_id, caller, team, tuple(filter(None, policies.split(","))),
                              *rest, bool(estimated), saved, endpoint, written, user, session))


def _key_columns(counter: CounterKey) -> tuple[str, str, str]:
    return counter.policy, counter.period, counter.window_id


def _amounts(charge: Charge) -> tuple[int, int, int]:
    return charge.usd_nano, charge.tokens, charge.requests


def _negated(charge: Charge) -> Charge:
    return Charge(-charge.usd_nano, -charge.tokens, -charge.requests)
