"""Rate windows and requests in flight in the embedded SQLite store (the same rules as reserve.lua).

A rate window's buckets are rows of `rate_buckets` (see `gateway.budget.rate_windows`); a check sums
the BUCKETS + 1 newest. Requests in flight are one row of `in_flight` per counter. A bucket row expires
once no window reaches it; a settlement arriving after that corrects nothing (as on Redis).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from gateway.budget.rate_windows import BUCKETS, bucket_ms, kind_of, split_each
from gateway.budget.store import CounterKey, ReserveLine, ReserveOutcome
from gateway.domain.pricing import Charge

__all__ = ["RATE_SCHEMA", "window_use", "in_flight", "check_rate", "add_rate", "close_rate", "rate_state",
           "drop_expired_rates", "used_after"]

Db = sqlite3.Connection

RATE_SCHEMA = """
CREATE TABLE IF NOT EXISTS rate_buckets (
    policy TEXT NOT NULL, period TEXT NOT NULL, each TEXT NOT NULL, bucket INTEGER NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0, tokens INTEGER NOT NULL DEFAULT 0, expires_at REAL NOT NULL,
    PRIMARY KEY (policy, period, each, bucket)
);
CREATE INDEX IF NOT EXISTS rate_buckets_expiry ON rate_buckets (expires_at);
CREATE TABLE IF NOT EXISTS in_flight (
    policy TEXT NOT NULL, each TEXT NOT NULL, requests INTEGER NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (policy, each)
);
"""


def _where(counter: CounterKey) -> tuple[str, str, str, int]:
    window, each = split_each(counter.window_id)
    return counter.policy, counter.period, each, int(window)


def window_use(db: Db, counter: CounterKey) -> tuple[int, int]:
    """(requests, tokens) used in the window ending at the counter's bucket."""
    policy, period, each, bucket = _where(counter)
    row = db.execute("SELECT TOTAL(requests), TOTAL(tokens) FROM rate_buckets WHERE policy = ? AND period = ?"
                     " AND each = ? AND bucket >= ?", (policy, period, each, bucket - BUCKETS)).fetchone()
    return int(row[0]), int(row[1])


def in_flight(db: Db, counter: CounterKey) -> int:
    """Requests in flight on an in-flight counter."""
    row = db.execute("SELECT requests FROM in_flight WHERE policy = ? AND each = ?",
                     (counter.policy, split_each(counter.window_id)[1])).fetchone()
    return row[0] if row else 0


def _wait(db: Db, counter: CounterKey, now: float, column: str, extra: int, limit: int, used: int) -> float:
    """Seconds until `extra` more fits (-1: never): once enough of the window's oldest buckets left it."""
    if extra > limit:
        return -1.0
    policy, period, each, bucket = _where(counter)
    size, need, freed = bucket_ms(period), used + extra - limit, 0
    rows = db.execute(f"SELECT bucket, {column} FROM rate_buckets WHERE policy = ? AND period = ? AND each = ?"
                      " AND bucket >= ? ORDER BY bucket", (policy, period, each, bucket - BUCKETS)).fetchall()
    for oldest, amount in rows:
        freed += amount
        if freed >= need:
            return max(0.001, ((oldest + BUCKETS + 1) * size - now * 1000) / 1000)
    return ((bucket + BUCKETS + 1) * size - now * 1000) / 1000


def check_rate(db: Db, index: int, line: ReserveLine, times: int, now: float,
               uses: dict[int, tuple[int, int]]) -> ReserveOutcome | None:
    """The refusal of a rate or in-flight line when `times` x its amount does not fit; None when it does.
    A rate window's (requests, tokens) used go to uses[index]."""
    amount, (_, token_limit, request_limit) = line.amount, line.limits
    if kind_of(line.counter) == "concurrent":
        if request_limit is not None and times * amount.requests > request_limit - in_flight(db, line.counter):
            return ReserveOutcome(False, index, "requests")
        return None
    requests, tokens = uses[index] = window_use(db, line.counter)
    refusal = None
    for unit, column, limit, extra, used in (("requests", "requests", request_limit, amount.requests, requests),
                                              ("tokens", "tokens", token_limit, amount.tokens, tokens)):
        if limit is not None and times * extra > limit - used:
            wait = _wait(db, line.counter, now, column, times * extra, limit, used)
            if refusal is None or wait < 0 or (refusal.retry_after or 0) >= 0 and wait > (refusal.retry_after or 0):
                refusal = ReserveOutcome(False, index, unit, retry_after=wait, used=(used,))  # type: ignore[arg-type]
    return refusal


def add_rate(db: Db, line: ReserveLine, times: int) -> None:
    """Add `times` x the line's amount to its bucket (or to its flight)."""
    amount = line.amount
    if kind_of(line.counter) == "concurrent":
        db.execute("INSERT INTO in_flight VALUES (?, ?, ?, ?) ON CONFLICT (policy, each) DO UPDATE SET"
                   " requests = requests + excluded.requests, expires_at = MAX(expires_at, excluded.expires_at)",
                   (line.counter.policy, split_each(line.counter.window_id)[1], times * amount.requests,
                    line.expires_at))
        return
    db.execute("INSERT INTO rate_buckets VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (policy, period, each, bucket)"
               " DO UPDATE SET requests = requests + excluded.requests, tokens = tokens + excluded.tokens",
               (*_where(line.counter), times * amount.requests, times * amount.tokens, line.expires_at))


def close_rate(db: Db, counter: CounterKey, amount: Charge, spent: Charge) -> None:
    """A rate line's bucket keeps `spent` instead of `amount`; an in-flight line leaves the flight."""
    if kind_of(counter) == "concurrent":
        db.execute("UPDATE in_flight SET requests = MAX(0, requests - ?) WHERE policy = ? AND each = ?",
                   (amount.requests, counter.policy, split_each(counter.window_id)[1]))
        return
    db.execute("UPDATE rate_buckets SET requests = requests + ?, tokens = tokens + ? WHERE policy = ?"
               " AND period = ? AND each = ? AND bucket = ?",
               (spent.requests - amount.requests, spent.tokens - amount.tokens, *_where(counter)))


def rate_state(db: Db, counter: CounterKey) -> tuple[Charge, Charge]:
    """(spent, reserved) as `read` reports them: a window's use as spent, a flight as reserved requests."""
    if kind_of(counter) == "concurrent":
        return Charge(), Charge(0, 0, in_flight(db, counter))
    requests, tokens = window_use(db, counter)
    return Charge(0, tokens, requests), Charge()


def drop_expired_rates(db: Db, now: float) -> None:
    """Delete buckets and flights past their expiry."""
    db.execute("DELETE FROM rate_buckets WHERE expires_at < ?", (now,))
    db.execute("DELETE FROM in_flight WHERE expires_at < ?", (now,))


def used_after(lines: Sequence[ReserveLine], uses: dict[int, tuple[int, int]], times: int) -> tuple[int, ...]:
    """Each group-0 rate line's (requests, tokens) used, `times` x its amount included."""
    used: list[int] = []
    for index, line in enumerate(lines):
        if index in uses and line.group == 0:
            requests, tokens = uses[index]
            used += [requests + times * line.amount.requests, tokens + times * line.amount.tokens]
    return tuple(used)

