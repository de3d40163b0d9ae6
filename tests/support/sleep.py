"""Injected sleeps for retry tests: they move a fake clock instead of sleeping."""

from __future__ import annotations

import asyncio

from gateway.clock import FakeClock

__all__ = ["RecordingSleep", "VirtualTime"]


class RecordingSleep:
    """The gateway's injected sleep: records each wait and moves the fake clock instead of waiting."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.advance(seconds)


class VirtualTime:
    """The gateway's injected sleep on a FakeClock: each sleeper waits until the test moves the clock past
    its end (`advance`), so retries and backoffs take no real time and run only when the test says."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    @property
    def sleepers(self) -> int:
        """How many sleeps are waiting."""
        return sum(1 for _, future in self._sleepers if not future.done())

    async def __call__(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        self._sleepers.append((self.clock.now() + seconds, future))
        await future

    async def advance(self, seconds: float) -> None:
        """Move the clock and wake every sleeper whose end has come; let them run a few loop turns."""
        self.clock.advance(seconds)
        due = [(end, future) for end, future in self._sleepers if end <= self.clock.now()]
        self._sleepers = [item for item in self._sleepers if item not in due]
        for _, future in due:
            if not future.done():
                future.set_result(None)
        for _ in range(5):
            await asyncio.sleep(0)
