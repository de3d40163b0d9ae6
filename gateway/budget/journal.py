"""A durable local journal of spend the store could not take, replayed idempotently when it is back.

Each line is one request's spend (JSON), with its ledger row under "entry". Replay moves the file aside
atomically, records every entry with `BudgetStore.record` (idempotent by request id, so a crash
mid-replay double counts nothing) and puts back what still fails. Lines written before the ledger
existed have no "entry" and replay without a ledger row; older gateways ignore the key.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from gateway.budget.store import BudgetStore, CounterKey, LedgerEntry
from gateway.errors import StoreError
from gateway.pricing import Charge

__all__ = ["SpendJournal", "SpendLine"]

SpendLine = tuple[CounterKey, Charge, float]


Journaled = tuple[str, list[SpendLine], LedgerEntry | None]


def _encode(request_id: str, lines: Sequence[SpendLine], entry: LedgerEntry | None) -> bytes:
    encoded: dict[str, Any] = {"id": request_id, "lines": [
        [c.policy, c.period, c.window_id, ch.usd_nano, ch.tokens, ch.requests, exp] for c, ch, exp in lines]}
    if entry is not None:
        encoded["entry"] = entry._asdict()
    return orjson.dumps(encoded)


def _decode(raw: bytes) -> Journaled:
    decoded = orjson.loads(raw)
    lines = [(CounterKey(p, per, w), Charge(u, t, r), exp) for p, per, w, u, t, r, exp in decoded["lines"]]
    row = decoded.get("entry")
    entry = LedgerEntry(**{**row, "policies": tuple(row["policies"])}) if row else None
    return decoded["id"], lines, entry


class SpendJournal:
    """Append-only, fsync'd file of spend waiting for the store."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._replaying = self.path.with_suffix(self.path.suffix + ".replaying")
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, request_id: str, lines: Sequence[SpendLine], entry: LedgerEntry | None = None) -> None:
        """Write one request's spend (and ledger row) durably before anyone is told it was counted."""
        with open(self.path, "ab") as journal:
            journal.write(_encode(request_id, lines, entry) + b"\n")
            journal.flush()
            os.fsync(journal.fileno())

    def has_entries(self) -> bool:
        return any(p.exists() and p.stat().st_size > 0 for p in (self.path, self._replaying))

    async def replay(self, store: BudgetStore, now: float) -> int:
        """Record every entry in the store; returns how many were replayed. Raises StoreError if any failed."""
        if not self._replaying.exists():
            if not self.path.exists():
                return 0
            os.replace(self.path, self._replaying)
        replayed, failed = 0, []
        for raw in self._replaying.read_bytes().splitlines():
            if not raw.strip():
                continue
            try:
                request_id, lines, entry = _decode(raw)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a line torn by a crash mid-write was never acknowledged to anyone
            try:
                await store.record(request_id, lines, now, entry)
                replayed += 1
            except StoreError:
                failed.append((request_id, lines, entry))
        for request_id, lines, entry in failed:
            self.append(request_id, lines, entry)
        self._replaying.unlink()
        if failed:
            raise StoreError(f"{len(failed)} journal entries could not be replayed yet")
        return replayed
