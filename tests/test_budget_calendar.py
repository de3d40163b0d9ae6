"""Budget windows through the gateway with an injected clock: local midnights, DST, month ends, leap days."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from gateway.budget.store import CounterKey
from gateway.clock import FakeClock
from gateway.config.model import BudgetLimit, Policy, PolicyMatch
from gateway.http.appkeys import BUDGET
from tests.support.settings import ADMIN_KEY, make_policy, make_settings

CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "tick"}], "max_tokens": 5}
HOUR = 3600


def at(local: str, tz: str) -> float:
    return datetime.fromisoformat(local).replace(tzinfo=ZoneInfo(tz)).timestamp()


async def test_daily_reset_at_local_midnight_in_ho_chi_minh_city(upstream, start_gateway, http):
    clock = FakeClock(at("2026-11-22T23:59:00", "Asia/Ho_Chi_Minh"))
    policy = make_policy("hcm", requests=2, timezone="Asia/Ho_Chi_Minh")
    gateway = await start_gateway(make_settings({"primary": upstream.url}, policies=(policy,)), clock=clock)
    statuses = [(await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status for _ in range(3)]
    refused = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)
    assert statuses == [200, 200, 429] and refused.headers["Retry-After"] == "60"

    clock.advance(60)   # 00:00:00 local, 17:00 UTC
    statuses = [(await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status for _ in range(3)]
    assert statuses == [200, 200, 429]
    [entry] = (await http(gateway, "GET", "/v1/budget/status", key=ADMIN_KEY)).json()["data"]
    assert entry["window_start"] == "2026-11-23T00:00:00+07:00" and entry["spent"] == 2
    assert entry["resets_at"] == "2026-11-24T00:00:00+07:00"
    [yesterday] = await gateway.app[BUDGET].store.read([CounterKey("hcm", "daily", "d2026-11-22")], clock.now())
    assert yesterday.spent.requests == 2        # nothing lost, nothing carried over


@pytest.mark.parametrize("tz, start, hours, expected_days, expected_months", [
    # Spring forward: 2026-03-08 has 23 hours in New York.
    ("America/New_York", "2026-03-07T00:30:00", 72,
     {"d2026-03-07": 24, "d2026-03-08": 23, "d2026-03-09": 24, "d2026-03-10": 1}, {"m2026-03": 72}),
    # Fall back: 2026-11-01 has 25 hours in New York; the month turns on the way.
    ("America/New_York", "2026-10-31T00:30:00", 49,
     {"d2026-10-31": 24, "d2026-11-01": 25}, {"m2026-10": 24, "m2026-11": 25}),
    # A leap day and a month end in UTC.
    ("UTC", "2028-02-28T00:30:00", 72,
     {"d2028-02-28": 24, "d2028-02-29": 24, "d2028-03-01": 24}, {"m2028-02": 48, "m2028-03": 24}),
])
async def test_exactly_one_reset_per_period(upstream, start_gateway, http, tz, start, hours, expected_days,
                                            expected_months):
    clock = FakeClock(at(start, tz))
    policy = Policy(name="cal", match=PolicyMatch(), timezone=tz, budgets=(
        BudgetLimit("daily", requests=1000), BudgetLimit("monthly", requests=100_000)))
    gateway = await start_gateway(make_settings({"primary": upstream.url}, policies=(policy,)), clock=clock)
    for _ in range(hours):
        assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200
        clock.advance(HOUR)

    store = gateway.app[BUDGET].store
    days = await store.read([CounterKey("cal", "daily", d) for d in expected_days], clock.now())
    months = await store.read([CounterKey("cal", "monthly", m) for m in expected_months], clock.now())
    assert {s.counter.window_id: s.spent.requests for s in days} == expected_days
    assert {s.counter.window_id: s.spent.requests for s in months} == expected_months
    assert sum(expected_days.values()) == hours == sum(expected_months.values())
