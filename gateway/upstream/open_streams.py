"""The upstream streams being relayed right now: each ends at its deadline (`stream_s`), and a shutdown can
end them all, as a broken upstream would."""

from __future__ import annotations

import asyncio
import math

import aiohttp

from gateway.upstream.stream_meter import STREAM_TIMEOUT, StreamOutcome

__all__ = ["OpenStreams", "MIN_WAKE_S"]

MIN_WAKE_S = 0.05   # deadlines this close together end in one wake-up, not one each


class OpenStreams:
    """Upstream responses being relayed to clients as SSE streams, each with its outcome and deadline.

    One loop timer, set for the earliest deadline, ends the streams past theirs: the relay sees its
    upstream break off with `outcome.ended_by` set to `stream_timeout`, and sends that error event. So a
    stream costs a dict entry, not a timer of its own (most streams end long before their deadline, and
    the timer set for one that ended just finds the next deadline). `cut_all` closes them all: each relay
    then sees its upstream break off, sends its client the `stream_truncated` error event and the request
    is charged for what it delivered, like any stream its upstream cut (see gateway.upstream.charging).
    """

    def __init__(self) -> None:
        self._streams: dict[aiohttp.ClientResponse, tuple[float, StreamOutcome]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._loop: asyncio.AbstractEventLoop | None = None   # the app's, at the first stream

    def __len__(self) -> int:
        return len(self._streams)

    def add(self, response: aiohttp.ClientResponse, outcome: StreamOutcome, stream_s: float) -> None:
        """A stream starts being relayed; it is ended `stream_s` from now (its provider's, from the response head)."""
        loop = self._loop or self._bind()
        deadline = loop.time() + stream_s
        self._streams[response] = (deadline, outcome)
        if deadline < self._timer_at:
            self._wake_at(deadline)

    def discard(self, response: aiohttp.ClientResponse) -> None:
        """A stream was relayed to its end (or its client left)."""
        self._streams.pop(response, None)

    def cut_all(self) -> int:
        """Close every upstream stream still being relayed; how many there were."""
        cut = list(self._streams)
        for response in cut:
            response.close()
        return len(cut)

    def _bind(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()   # once: on 3.11 it costs a getpid() call each time
        return self._loop

    def _wake_at(self, when: float) -> None:
        assert self._loop is not None
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = self._loop.call_at(when, self._end_overdue), when

    def _end_overdue(self) -> None:
        """End the streams past their deadline; wake again for the earliest one left."""
        assert self._loop is not None
        self._timer, self._timer_at = None, math.inf
        now = self._loop.time()
        overdue = [response for response, (deadline, _) in self._streams.items() if deadline <= now]
        for response in overdue:
            _, outcome = self._streams.pop(response)
            if outcome.ended_by is None:
                outcome.ended_by = STREAM_TIMEOUT
            response.close()
        if self._streams:
            earliest = min(deadline for deadline, _ in self._streams.values())
            self._wake_at(max(earliest, now + MIN_WAKE_S))
