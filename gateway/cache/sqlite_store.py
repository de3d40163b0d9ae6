"""Cache entries in an embedded SQLite file, bounded on disk: the least recently used go first past `max_bytes`.

The bound is on the file itself: after each write, while the pages in use (page_count - freelist_count)
pass what the bound leaves beside the write-ahead log, the least recently used entries are deleted, and
the freed pages are handed back to the file system (auto_vacuum=INCREMENTAL). The log is checkpointed
and truncated once it passes an eighth of the bound, so the file and its log stay within `max_bytes`
(one write larger than that eighth may pass it until its checkpoint). Entries live on disk: memory holds
SQLite's page cache (512 KiB) and the entry being read or written. Recency is a counter in the file
(the largest `used` + 1), so workers sharing the file share one order.

One connection on one worker thread, as the budget's embedded store; a file of its own beside the
budget's (`<name>-cache.db`), so cache writes never wait on the budget's write lock.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from gateway.errors import StoreError

__all__ = ["SqliteCacheStore", "cache_path"]

T = TypeVar("T")
_EVICT_BATCH = 16
_NEXT = "(SELECT COALESCE(MAX(used), 0) + 1 FROM entries)"   # the next recency stamp
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY, value BLOB NOT NULL, expires_at REAL NOT NULL, used INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_used ON entries (used);
CREATE INDEX IF NOT EXISTS entries_expiry ON entries (expires_at);
"""


def cache_path(budget_path: str) -> str:
    """The cache file beside the budget store's file: `gateway.db` -> `gateway-cache.db`."""
    path = Path(budget_path)
    return str(path.with_name(f"{path.stem}-cache{path.suffix or '.db'}"))


class SqliteCacheStore:
    """CacheStore in a SQLite file of its own, bounded by `max_bytes` (given on each write: it may be reloaded)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-sqlite")
        self._conn: sqlite3.Connection | None = None
        self.bounds_time = False

    def expect_ttl(self, ttl_s: float) -> None:
        """Nothing to do: every lookup reads the file."""

    def may_hold(self, key: str, now: float) -> bool:
        """Always (each lookup reads the file: other workers write to it too)."""
        return True

    async def get(self, key: str, now: float) -> bytes | None:
        """The value, stamped as just used; None when absent or expired (an expired one is deleted)."""
        return await self._run(lambda db: self._get(db, key, now))

    async def put(self, key: str, value: bytes, now: float, expires_at: float, max_bytes: int) -> None:
        """Store the value, then evict the least recently used entries past the bound."""
        await self._run(lambda db: self._put(db, key, value, now, expires_at, max_bytes))

    async def close(self) -> None:
        """Close the file on its thread and stop the thread."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close)
        self._executor.shutdown(wait=False)

    def stored_bytes(self) -> int:
        """The file and its write-ahead log, in bytes (what the bound holds)."""
        return sum(os.path.getsize(name) for name in (self.path, self.path + "-wal") if os.path.exists(name))

    # --- the worker thread ---

    def _get(self, db: sqlite3.Connection, key: str, now: float) -> bytes | None:
        row = db.execute("SELECT value, expires_at FROM entries WHERE key = ?", (key,)).fetchone()
        if row is None:
            return None
        with db:
            if row[1] <= now:
                db.execute("DELETE FROM entries WHERE key = ?", (key,))
                return None
            db.execute(f"UPDATE entries SET used = {_NEXT} WHERE key = ?", (key,))
        return bytes(row[0])

    def _put(self, db: sqlite3.Connection, key: str, value: bytes, now: float, expires_at: float,
             max_bytes: int) -> None:
        with db:
            db.execute("DELETE FROM entries WHERE expires_at <= ?", (now,))
            db.execute(f"INSERT OR REPLACE INTO entries VALUES (?, ?, ?, {_NEXT})", (key, value, expires_at))
            self._evict(db, max_bytes - max_bytes // 8)
        db.execute("PRAGMA incremental_vacuum").fetchall()
        if os.path.exists(self.path + "-wal") and os.path.getsize(self.path + "-wal") > max_bytes // 8:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def _evict(self, db: sqlite3.Connection, limit: int) -> None:
        """Delete the least recently used entries while the pages in use pass `limit` bytes."""
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        while True:
            pages = db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
            if pages * page_size <= limit:
                return
            oldest = db.execute("SELECT key FROM entries ORDER BY used LIMIT ?", (_EVICT_BATCH,)).fetchall()
            if not oldest:
                return
            db.executemany("DELETE FROM entries WHERE key = ?", oldest)

    async def _run(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._guarded, operation)

    def _guarded(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return operation(self._connection())
        except sqlite3.Error as exc:
            raise StoreError(f"sqlite cache {self.path!r} failed: {exc}") from exc

    def _connection(self) -> sqlite3.Connection:
        """The worker thread's connection, opened (file, pragmas and schema) on first use."""
        if self._conn is None:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=5.0)
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")   # only takes on a new file, before any table
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA cache_size=-512")           # KiB of page cache: entries are read from disk
            conn.executescript(_SCHEMA)
            self._conn = conn
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
