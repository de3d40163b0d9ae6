"""Calendar windows in the policy's time zone: local midnights, DST days, month ends, leap days."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from gateway.budget.windows import seconds_until_reset, window_for
from gateway.clock import FakeClock

HOUR = 3600


def ts(iso: str, tz: str) -> float:
    """Epoch seconds of a local wall time in `tz`."""
    return datetime.fromisoformat(iso).replace(tzinfo=ZoneInfo(tz)).timestamp()


def utc(iso: str) -> float:
    return datetime.fromisoformat(iso + "+00:00").timestamp()


def test_ho_chi_minh_day_resets_at_local_midnight() -> None:
    tz = "Asia/Ho_Chi_Minh"  # UTC+7: local midnight is 17:00 UTC the day before
    before = window_for("daily", tz, utc("2026-11-22T16:59:59"))
    after = window_for("daily", tz, utc("2026-11-22T17:00:00"))
    assert before.id == "d2026-11-22"
    assert after.id == "d2026-11-23"
    assert before.end_ts == after.start_ts == utc("2026-11-22T17:00:00")
    assert after.start.isoformat() == "2026-11-23T00:00:00+07:00"
    assert after.end_ts - after.start_ts == 24 * HOUR


def test_new_york_dst_start_day_lasts_23_hours() -> None:
    window = window_for("daily", "America/New_York", ts("2026-03-08T12:00", "America/New_York"))
    assert window.id == "d2026-03-08"
    assert window.start.isoformat() == "2026-03-08T00:00:00-05:00"
    assert window.end.isoformat() == "2026-03-09T00:00:00-04:00"
    assert window.end_ts - window.start_ts == 23 * HOUR


def test_new_york_dst_end_day_lasts_25_hours() -> None:
    tz = "America/New_York"
    window = window_for("daily", tz, utc("2026-11-01T05:30"))  # 01:30 EDT, the first of two 01:30s
    assert window.id == "d2026-11-01"
    assert window.end_ts - window.start_ts == 25 * HOUR
    second_half_hour = window_for("daily", tz, utc("2026-11-01T06:30"))  # 01:30 EST
    assert second_half_hour == window


def test_month_ends_at_local_midnight_on_the_first() -> None:
    tz = "America/New_York"
    last_second = window_for("monthly", tz, ts("2026-01-31T23:59:59", tz))
    first_second = window_for("monthly", tz, ts("2026-02-01T00:00:00", tz))
    assert (last_second.id, first_second.id) == ("m2026-01", "m2026-02")
    assert last_second.end_ts == first_second.start_ts
    assert last_second.end_ts - last_second.start_ts == 31 * 24 * HOUR


def test_december_rolls_into_january_of_next_year() -> None:
    window = window_for("monthly", "UTC", utc("2026-12-15T00:00"))
    assert window.id == "m2026-12"
    assert window.end.isoformat() == "2027-01-01T00:00:00+00:00"


def test_monthly_window_spanning_dst_change_is_an_hour_short() -> None:
    window = window_for("monthly", "America/New_York", utc("2026-03-20T00:00"))
    assert window.end_ts - window.start_ts == 31 * 24 * HOUR - HOUR


def test_leap_day_2028() -> None:
    tz = "Asia/Ho_Chi_Minh"
    day = window_for("daily", tz, ts("2028-02-29T12:00", tz))
    assert day.id == "d2028-02-29"
    assert day.end.isoformat() == "2028-03-01T00:00:00+07:00"
    month = window_for("monthly", tz, ts("2028-02-29T23:59:59", tz))
    assert month.id == "m2028-02"
    assert month.end_ts - month.start_ts == 29 * 24 * HOUR


@pytest.mark.parametrize(
    ("period", "tz", "start", "end", "changes"),
    [
        ("daily", "Asia/Ho_Chi_Minh", "2026-11-21", "2026-12-01", 10),
        ("daily", "America/New_York", "2026-03-01", "2026-03-15", 14),   # through DST start
        ("daily", "America/New_York", "2026-10-25", "2026-11-08", 14),   # through DST end
        ("daily", "UTC", "2028-02-27", "2028-03-02", 4),                 # through a leap day
        ("monthly", "America/New_York", "2026-01-01", "2027-01-01", 12),
        ("monthly", "Asia/Ho_Chi_Minh", "2028-01-01", "2029-01-01", 12),  # leap year
    ],
)
def test_exactly_one_id_change_per_period_on_a_stepped_clock(
    period: str, tz: str, start: str, end: str, changes: int
) -> None:
    clock = FakeClock(ts(f"{start}T00:00:01", tz))
    end_ts = ts(f"{end}T00:00:01", tz)
    previous = window_for(period, tz, clock.now())
    seen = [previous.id]
    while clock.now() < end_ts:
        before = clock.now()
        clock.advance(15 * 60)
        window = window_for(period, tz, clock.now())
        if window.id != previous.id:
            assert before < window.start_ts <= clock.now() and window.start_ts == previous.end_ts
            seen.append(window.id)
        previous = window
    assert len(seen) == len(set(seen)) == changes + 1


def test_window_contains_now_and_windows_tile() -> None:
    tz = "America/New_York"
    now = ts("2026-03-07T22:00", tz)
    for _ in range(30):
        window = window_for("daily", tz, now)
        assert window.start_ts <= now < window.end_ts
        now = window.end_ts
        assert window_for("daily", tz, now).start_ts == window.end_ts


def test_seconds_until_reset_rounds_up_and_is_at_least_one() -> None:
    window = window_for("daily", "UTC", utc("2026-11-22T12:00"))
    assert seconds_until_reset(window, utc("2026-11-22T23:59:58.2")) == 2
    assert seconds_until_reset(window, window.end_ts - 0.001) == 1
    assert seconds_until_reset(window, window.end_ts) == 1
    assert seconds_until_reset(window, utc("2026-11-22T12:00")) == 12 * HOUR


def test_unknown_period_is_rejected() -> None:
    with pytest.raises(ValueError, match="weekly"):
        window_for("weekly", "UTC", 0.0)  # type: ignore[arg-type]
