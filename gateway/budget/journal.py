"""A durable local journal of spend the store could not take, replayed idempotently when it is back.

Each line is one request's spend (JSON), with its ledger row under "entry". Replay moves the file aside
atomically, sends every entry again and puts back what still fails. Every replay counts once, however
often it is sent (a crash mid-replay, an answer lost):

- a request that holds a reservation in the store (its settle or release failed: it may or may not have
  reached the store) is settled or released again ("replay": "settle" | "release"): that changes
  nothing once the reservation is gone, settled or turned into spend by its ended lease;
- a request admitted on the local fail-open allowance, which the store never saw, is recorded with
  `BudgetStore.record` (idempotent by request id). Lines without "replay" (older gateways) replay so.

Lines written before the ledger existed have no "entry" and replay without a ledger row; older
gateways ignore the keys they do not know.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import orjson

from gateway.budget.store import BudgetStore, CounterKey, LedgerEntry
from gateway.domain.pricing import Charge
from gateway.errors import StoreError

__all__ = ["SpendJournal", "SpendLine"]

SpendLine = tuple[CounterKey, Charge, float]
Replay = Literal["record", "settle", "release"]   # how an entry is sent to the store again (module doc)
REPLAYS: tuple[Replay, ...] = get_args(Replay)

Journaled = tuple[str, list[SpendLine], LedgerEntry | None, Replay]
REPLAY_BATCH = 256   # entries sent together on replay to a store whose calls share writes (pipelined Redis)
REPLAY_BATCH_UNPIPELINED = 32   # to one that runs calls one by one (SQLite, Cluster): live requests queue behind


def _encode(request_id: str, lines: Sequence[SpendLine], entry: LedgerEntry | None, replay: Replay) -> bytes:
    encoded: dict[str, Any] = {"id": request_id, "lines": [
        [c.policy, c.period, c.window_id, ch.usd_nano, ch.tokens, ch.requests, exp] for c, ch, exp in lines]}
    if entry is not None:
        encoded["entry"] = entry._asdict()
    if replay != "record":
        encoded["replay"] = replay
    return orjson.dumps(encoded)


def _decode(raw: bytes) -> Journaled:
    decoded = orjson.loads(raw)
    lines = [(CounterKey(p, per, w), Charge(u, t, r), exp) for p, per, w, u, t, r, exp in decoded["lines"]]
    row = decoded.get("entry")
    entry = LedgerEntry(**{**row, "policies": tuple(row["policies"])}) if row else None
    replay = decoded.get("replay", "record")
    if replay not in REPLAYS:
        raise ValueError(f"unknown replay {replay!r}")
    return decoded["id"], lines, entry, replay


def _send_again(store: BudgetStore, now: float, request_id: str, lines: list[SpendLine],
                entry: LedgerEntry | None, replay: Replay) -> Awaitable[object]:
    """One journal entry to the store, as its `replay` says (see the module doc)."""
    if replay == "settle":
        return store.settle(request_id, [(counter, charge) for counter, charge, _ in lines], now, entry)
    if replay == "release":
        return store.release(request_id, now, entry)
    return store.record(request_id, lines, now, entry)


async def _send_batch(store: BudgetStore, now: float, batch: list[Journaled]) -> list[object]:
    """Send every entry of `batch` at once (they share writes where the store can); the outcome of each."""
    calls: list[Awaitable[object]] = []
    for journaled in batch:
        try:
            calls.append(_send_again(store, now, *journaled))
        except Exception as exc:             # refused before it was sent: its outcome
            calls.append(_raised(exc))
    store.flush()                            # someone waits for these: no holding them back
    return await asyncio.gather(*calls, return_exceptions=True)


async def _raised(exc: Exception) -> object:
    raise exc


class SpendJournal:
    """Append-only, fsync'd file of spend waiting for the store."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._replaying = self.path.with_suffix(self.path.suffix + ".replaying")
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, request_id: str, lines: Sequence[SpendLine], entry: LedgerEntry | None = None,
               replay: Replay = "record") -> None:
        """Write one request's spend (and ledger row) durably before anyone is told it was counted.

        `replay`: "settle" or "release" for a request that holds a reservation in the store, "record" for
        one the store never saw.
        """
        with open(self.path, "ab") as journal:
            journal.write(_encode(request_id, lines, entry, replay) + b"\n")
            journal.flush()
            os.fsync(journal.fileno())

    def has_entries(self) -> bool:
        return any(p.exists() and p.stat().st_size > 0 for p in (self.path, self._replaying))

    async def replay(self, store: BudgetStore, now: float) -> int:
        """Send every entry to the store again; returns how many were replayed. Raises StoreError if any failed."""
        if not self._replaying.exists():
            if not self.path.exists():
                return 0
            os.replace(self.path, self._replaying)
        entries: list[Journaled] = []
        for raw in self._replaying.read_bytes().splitlines():
            if not raw.strip():
                continue
            try:
                entries.append(_decode(raw))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a line torn by a crash mid-write was never acknowledged to anyone
        replayed, failed = 0, []
        # A batch at a time, so a pipelined store sends many per round trip (and per write).
        size = REPLAY_BATCH if store.capabilities.shares_writes else REPLAY_BATCH_UNPIPELINED
        for start in range(0, len(entries), size):
            batch = entries[start:start + size]
            outcomes = await _send_batch(store, now, batch)
            for journaled, outcome in zip(batch, outcomes):
                if isinstance(outcome, (StoreError, asyncio.CancelledError)):   # a call the store dropped
                    failed.append(journaled)
                elif isinstance(outcome, BaseException):
                    raise outcome             # the file stays aside: the next replay sends it all again
                else:
                    replayed += 1
        for request_id, lines, entry, replay in failed:
            self.append(request_id, lines, entry, replay)
        self._replaying.unlink()
        if failed:
            raise StoreError(f"{len(failed)} journal entries could not be replayed yet")
        return replayed
