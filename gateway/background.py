"""Long-lived background tasks that never die silently: a failure is logged, counted, and the task goes on.

The config reload watcher, alert delivery, journal replay and every other task that runs for the life of
the app loops through `keep_running`. An exception in one step (a full file descriptor table, a store that
answers garbage, a bug) is logged once with its traceback, counted in `BackgroundFailures` (the metrics
read the counts at scrape), and the loop carries on after a pause. Only cancellation ends it.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable

__all__ = ["BackgroundFailures", "keep_running", "PAUSE_AFTER_FAILURE_S"]

log = logging.getLogger("gateway")
Sleep = Callable[[float], Awaitable[None]]
PAUSE_AFTER_FAILURE_S = 1.0


class BackgroundFailures:
    """How often each named background task failed; task names are fixed in code (a bounded label)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def failed(self, task: str, error: BaseException) -> None:
        """Log one failure of `task` with where it happened, and count it.

        Only an OSError's message is logged (it names the resource: "Too many open files"); other messages
        may quote a secret, such as a webhook URL, so they are left out.
        """
        self.counts[task] = self.counts.get(task, 0) + 1
        what = f"{type(error).__name__}: {error}" if isinstance(error, OSError) else type(error).__name__
        where = "".join(traceback.format_tb(error.__traceback__)).rstrip()
        log.error("background task '%s' failed (%s); it keeps running\n%s", task, what, where)


async def keep_running(task: str, step: Callable[[], Awaitable[object]], failures: BackgroundFailures, *,
                       pause_s: float = PAUSE_AFTER_FAILURE_S, sleep: Sleep = asyncio.sleep) -> None:
    """Await `step()` again and again until cancelled; a step that raises is logged, counted, and retried
    after `pause_s` (the step itself waits between turns when it should).

    A cancellation that a step swallowed (some drivers turn it into their own error or a quiet return)
    still ends the loop after that step: otherwise whoever cancelled it would wait forever.
    """
    me = asyncio.current_task()
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if me is not None and me.cancelling():
                raise asyncio.CancelledError from error
            failures.failed(task, error)
            await sleep(pause_s)
        if me is not None and me.cancelling():
            raise asyncio.CancelledError
