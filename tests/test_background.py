"""Long-lived background tasks survive exceptions: logged once each, counted, and they go on."""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.background import BackgroundFailures, keep_running


async def test_a_failing_step_is_logged_counted_and_the_task_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    failures, turns, pauses = BackgroundFailures(), [], []
    done = asyncio.Event()

    async def step() -> None:
        turns.append(len(turns))
        if len(turns) in (1, 3):
            raise OSError(24, "Too many open files")
        if len(turns) == 5:
            done.set()
        await asyncio.sleep(0)

    async def pause(seconds: float) -> None:
        pauses.append(seconds)

    with caplog.at_level(logging.ERROR, logger="gateway"):
        task = asyncio.create_task(keep_running("config_reload", step, failures, sleep=pause))
        await asyncio.wait_for(done.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert failures.counts == {"config_reload": 2}
    assert len(pauses) == 2
    lines = [r.getMessage() for r in caplog.records if "config_reload" in r.getMessage()]
    assert len(lines) == 2 and all("Too many open files" in line for line in lines)


async def test_only_an_oserror_message_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    failures, url = BackgroundFailures(), "https://hooks.example/" + "secret-token"
    with caplog.at_level(logging.ERROR, logger="gateway"):
        try:
            raise ValueError(url)
        except ValueError as error:
            failures.failed("alert_delivery", error)
    assert "secret-token" not in caplog.text and "ValueError" in caplog.text


@pytest.mark.parametrize("swallow", ["return", "raise"])
async def test_a_step_that_swallows_its_cancellation_still_ends_the_loop(swallow: str) -> None:
    """As a store driver does that turns a cancelled read into a quiet return or its own error."""
    failures, started = BackgroundFailures(), asyncio.Event()

    async def step() -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            if swallow == "raise":
                raise ConnectionError("connection closed while reading") from None

    task = asyncio.create_task(keep_running("journal_replay", step, failures))
    await asyncio.wait_for(started.wait(), 5)
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)

    assert done and task.cancelled()
    assert failures.counts == {}
