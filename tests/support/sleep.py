"""An injected sleep for retry tests: it records each wait and moves a fake clock instead of sleeping."""

from __future__ import annotations

from gateway.clock import FakeClock

__all__ = ["RecordingSleep"]


class RecordingSleep:
    """The gateway's injected sleep: records each wait and moves the fake clock instead of waiting."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.clock.advance(seconds)
