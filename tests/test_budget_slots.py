"""The per-request budget work kept between requests: windows, matching policies and their slots."""

from __future__ import annotations

import dataclasses

from gateway.budget.matching import matching_policies
from gateway.budget.slots import SlotCache, budget_slots
from gateway.budget.windows import WindowCache, window_for
from gateway.config.model import CallerIdentity
from tests.support.settings import make_policy, make_settings
from tests.test_budget_windows import ts, utc

WEB = CallerIdentity("web-app", team="web", tags=("prod",))
BATCH = CallerIdentity("batch", team="data")


def test_cached_windows_equal_fresh_ones_across_midnights_and_a_clock_set_back() -> None:
    cache = WindowCache()
    tz = "America/New_York"
    start = ts("2026-03-07T22:00", tz)   # through the 23-hour DST day
    instants = [start + step * 1800.0 for step in range(0, 150)]
    for now in [*instants, *reversed(instants), start]:
        for period in ("daily", "monthly"):
            assert cache.window_for(period, tz, now) == window_for(period, tz, now)


def test_a_match_is_kept_per_caller_and_model_until_the_settings_change() -> None:
    settings = make_settings({"p": "http://127.0.0.1:1"}, policies=(
        make_policy("web", usd="1", teams=("web",)), make_policy("mini", usd="1", models=("gpt-4o-mini",))))
    cache = SlotCache()
    match = cache.match(settings, WEB, "gpt-4o-mini")
    assert [p.name for p in match.policies] == ["web", "mini"]
    assert cache.match(settings, WEB, "gpt-4o-mini") is match
    assert [p.name for p in cache.match(settings, BATCH, "gpt-4o-mini").policies] == ["mini"]
    assert [p.name for p in cache.match(settings, WEB, "gpt-4o").policies] == ["web"]
    reloaded = dataclasses.replace(settings, policies=settings.policies[1:])
    assert [p.name for p in cache.match(reloaded, WEB, "gpt-4o-mini").policies] == ["mini"]


def test_slots_follow_the_clock_into_the_next_window() -> None:
    settings = make_settings({"p": "http://127.0.0.1:1"}, policies=(
        make_policy("day", usd="1"), make_policy("month", period="monthly", usd="1", timezone="Asia/Tokyo")))
    cache = SlotCache()
    match = cache.match(settings, WEB, "gpt-4o-mini")
    for now in (utc("2026-11-30T14:59:59"), utc("2026-11-30T15:00:00"), utc("2026-11-30T23:59:59"),
                utc("2026-12-01T00:00:00"), utc("2026-11-30T12:00:00")):
        fresh = budget_slots(matching_policies(settings.policies, WEB, "gpt-4o-mini"), now, WindowCache())
        assert cache.slots(match, now) == fresh
        assert all(slot.window.start_ts <= now < slot.window.end_ts for slot in fresh)
