"""The budget store's canary records on Redis: one hash per canary, synced and moved by a script each on a
pool connection (a canary syncs a few times a second at most: it needs no pipeline)."""

from __future__ import annotations

from collections.abc import Awaitable, Sequence
from typing import Any

from redis.asyncio import Redis, RedisCluster

from gateway.budget.canary_record import (
    ArmTally, CanaryRecord, CanaryStatus, check_canary_move, fields_of, record_of, tally_fields,
)
from gateway.budget.redis_driver import PublicApiDriver
from gateway.budget.redis_records import script_source
from gateway.budget.store import time_ms

__all__ = ["RedisCanaries"]

_CANARY_SCRIPTS = ("canary_sync", "canary_move")


class RedisCanaries:
    """Adds arm tallies to a canary's record and moves its step by compare-and-set, on redis-py's public API."""

    def __init__(self, client: Redis | RedisCluster, commands: PublicApiDriver, prefix: str) -> None:
        self._commands = commands
        self._prefix = prefix
        self._scripts = {name: client.register_script(script_source(name)) for name in _CANARY_SCRIPTS}

    async def sync(self, canary: str, step: int, tallies: Sequence[ArmTally], now: float,
                   expires_at: float) -> CanaryRecord:
        """Add the tallies of `step` and read the canary back."""
        args = [f"[{int(step)},{time_ms(now)},{time_ms(expires_at)}]"]
        for name, delta in tally_fields(tallies):
            args += [name, str(delta)]
        flat = await self._script("canary_sync", canary, args)
        stored = {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}
        return record_of(int(stored["step"]), stored["status"], int(stored["since"]) / 1000,
                         [(name, int(value)) for name, value in fields_of(stored)])   # type: ignore[arg-type]

    async def move(self, canary: str, from_step: int, to_step: int, status: CanaryStatus, now: float,
                   expires_at: float) -> bool:
        """Move the canary on by compare-and-set on its step."""
        check_canary_move(from_step, to_step, status)
        args = [f"[{int(from_step)},{int(to_step)},{time_ms(now)},{time_ms(expires_at)}]", status]
        return await self._script("canary_move", canary, args) == 1

    def _script(self, name: str, canary: str, args: list[str]) -> Awaitable[Any]:
        """A canary script on a pool connection, on the canary's one key."""
        keys = [f"{self._prefix}canary:{canary}"]
        return self._commands.command(name, lambda: self._commands.evalsha(self._scripts[name], keys, args))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
