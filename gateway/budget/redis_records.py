"""The budget store's rare calls on Redis: ledger reads (XRANGE pages) and alert claims (scripts on a pool
connection), never down the script pipeline of the hot path."""

from __future__ import annotations

from collections.abc import Awaitable
from importlib import resources
from typing import Any

import orjson
from redis.asyncio import Redis, RedisCluster

from gateway.budget.redis_driver import PublicApiDriver
from gateway.budget.store import LEDGER_FIELDS, LedgerEntry, time_ms

__all__ = ["LedgerAndAlerts", "script_source", "ms", "LEDGER_PAGE"]

LEDGER_PAGE = 5_000   # rows per XRANGE, so a long ledger read never blocks Redis for long
_ALERT_SCRIPTS = ("alert_claim", "alert_delivered", "alert_pending")


class LedgerAndAlerts:
    """Reads the ledger stream and claims, marks and lists budget alerts, on redis-py's public API."""

    def __init__(self, client: Redis | RedisCluster, commands: PublicApiDriver, prefix: str) -> None:
        self._client = client
        self._commands = commands
        self._prefix = prefix
        self._scripts = {name: client.register_script(script_source(name)) for name in _ALERT_SCRIPTS}

    def _key(self, kind: str, request_id: str | None = None) -> str:
        return f"{self._prefix}{kind}" if request_id is None else f"{self._prefix}{kind}:{request_id}"

    async def ledger(self, since: float, until: float, limit: int) -> list[LedgerEntry]:
        """The oldest `limit` rows with since <= time < until, read in pages of LEDGER_PAGE."""
        rows: list[LedgerEntry] = []
        start, end = str(time_ms(since)), str(time_ms(until) - 1)   # whole-ms ids: [since, until)
        while len(rows) < limit:
            count = min(LEDGER_PAGE, limit - len(rows))
            page = await self._commands.command("ledger", lambda: self._ledger_page(start, end, count))
            rows += [_entry(stream_id, fields) for stream_id, fields in page]
            if len(page) < count:
                break
            start = "(" + _text(page[-1][0])
        return rows

    def _ledger_page(self, start: str, end: str, count: int) -> Awaitable[Any]:
        """XRANGE of up to `count` rows: [(stream id, fields)] (redis-py types every reply as optional)."""
        return self._client.xrange(self._key("ledger"), start, end, count)

    async def claim_alert(self, key: str, payload: str, now: float, lease_until: float, expires_at: float) -> bool:
        """Claim alert `key` until `lease_until`; it expires at `expires_at` on Redis's clock."""
        keys = [self._key("alert", key), self._key("alert_leases")]
        args = [key, payload, f"[{ms(now)},{ms(lease_until)},{ms(expires_at)}]"]
        return await self._alert_script("alert_claim", keys, args) == 1

    async def alert_delivered(self, key: str) -> None:
        """Mark alert `key` delivered."""
        await self._alert_script("alert_delivered", [self._key("alert", key), self._key("alert_leases")], [key])

    async def pending_alerts(self, now: float, limit: int) -> list[tuple[str, str]]:
        """Claimed, undelivered alerts whose lease ended, oldest lease first."""
        flat = await self._alert_script("alert_pending", [self._key("alert_leases")],
                                        [self._prefix, f"[{ms(now)},{limit}]"])
        return [(_text(flat[i]), _text(flat[i + 1])) for i in range(0, len(flat), 2)]

    def _alert_script(self, name: str, keys: list[str], args: list[str]) -> Awaitable[Any]:
        """An alert script on a pool connection (alerts are rare: they need no pipeline)."""
        return self._commands.command(name, lambda: self._commands.evalsha(self._scripts[name], keys, args))


def script_source(name: str) -> str:
    """The Lua source of one operation, after the shared helpers of lib.lua."""
    lua = resources.files("gateway.budget").joinpath("lua")
    return "\n".join(lua.joinpath(file).read_text("utf-8") for file in ("lib.lua", f"{name}.lua"))


def ms(epoch_s: float) -> int:
    """Epoch seconds as whole milliseconds, rounded (a script's times)."""
    return round(epoch_s * 1000)


_ROW_INTS = ("prompt", "completion", "cached", "cost", "latency_ms", "attempts")


def _entry(stream_id: bytes | str, raw: dict[Any, Any]) -> LedgerEntry:
    """A ledger row read back; its time is its stream id's."""
    filed_at = int(_text(stream_id).partition("-")[0]) / 1000
    row = raw.get(b"row", raw.get("row"))
    if row is not None:
        request_id, caller, team, policies, *rest = orjson.loads(row)
        # rows of earlier builds lack the later fields (defaults); fields a later build adds are left out
        return LedgerEntry(filed_at, request_id, caller, team, tuple(policies), *rest[:LEDGER_FIELDS - 5])
    fields = {_text(key): _text(value) for key, value in raw.items()}
    ints = {name: int(fields[name] or 0) for name in _ROW_INTS}
    return LedgerEntry(
        time=filed_at, request_id=fields["id"],
        caller=fields["caller"] or None, team=fields["team"] or None,
        policies=tuple(filter(None, fields["policies"].split(","))), model=fields["model"] or None,
        provider=fields["provider"] or None, prompt_tokens=ints["prompt"], completion_tokens=ints["completion"],
        cached_tokens=ints["cached"], cost_nano=ints["cost"], status=fields["status"],  # type: ignore[arg-type]
        latency_ms=ints["latency_ms"], attempts=ints["attempts"],
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
