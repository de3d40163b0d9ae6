"""What the script pipeline writes to Redis: every write that carries an EVALSHA, as bytes, in order."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.budget.redis_batch import ScriptPipeline


class RedisWrites:
    """Records the pipeline's writes from now on (its one seam to the socket, `ScriptPipeline._send`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.writes: list[bytes] = []
        self._changed = asyncio.Event()
        send = ScriptPipeline._send

        def recording_send(pipeline: ScriptPipeline, protocol: Any, data: bytes) -> None:
            send(pipeline, protocol, data)
            if b"EVALSHA" in data:
                self.writes.append(data)
                self._changed.set()

        monkeypatch.setattr(ScriptPipeline, "_send", recording_send)

    def calls_per_write(self) -> list[int]:
        """How many EVALSHA calls each write carried."""
        return [write.count(b"EVALSHA") for write in self.writes]

    async def until(self, count: int, within_s: float) -> None:
        """Wait (bounded) until `count` writes were made."""
        async with asyncio.timeout(within_s):
            while len(self.writes) < count:
                self._changed.clear()
                await self._changed.wait()
