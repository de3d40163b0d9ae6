"""Spend forecasts with an injected clock: a steady $1/hour from midnight projects $24 for the day, runs out
at the right time, shows in status, `gateway status` and the gauges, and alerts its webhook once."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from decimal import Decimal

from gateway.budget.forecast import forecast
from gateway.clock import FakeClock
from gateway.config.model import AlertConfig, StoreConfig
from gateway.http.appkeys import ALERTS, BUDGET, FORECASTS
from gateway.mock_upstream import Action
from gateway.status_cli import render_budgets
from tests.support.metrics import scrape, value
from tests.support.settings import ADMIN_KEY, make_policy, make_settings
from tests.test_alerts import receiver, wait_until  # noqa: F401 - the webhook receiver fixture

MIDNIGHT = datetime(2026, 11, 22, tzinfo=timezone.utc).timestamp()
HOUR = 3600.0
ONE_DOLLAR = Action(usage={"prompt_tokens": 0, "completion_tokens": 125_000, "total_tokens": 125_000})  # $8/M
CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "a dollar"}], "max_tokens": 125_000}


async def forecasting(start_gateway, upstream, receiver, tmp_path, clock: FakeClock, usd: str):  # noqa: F811
    """A gateway with one daily budget of `usd` that alerts `receiver` once its projection passes the limit."""
    policy = dataclasses.replace(make_policy(f"daily-{usd}", usd=usd), forecast_alert=Decimal("1.0"),
                                 alerts=AlertConfig(receiver.url))
    settings = make_settings({"primary": upstream.url}, policies=(policy,),
                             store=StoreConfig(path=str(tmp_path / "b.db"), reserve_ahead=False))
    return await start_gateway(settings, clock=clock)


def test_the_forecast_follows_the_current_rate():
    # half a day at $1/h, then the last hour at $3/h: the projection and the end follow the last hour
    ahead = forecast(14, 20, 0, 24 * HOUR, 12 * HOUR, 3)
    assert (ahead.burn_per_hour, ahead.projected_at_reset) == (3, 14 + 3 * 12)
    assert ahead.burn_per_hour_window == 14 / 12 and ahead.exhausted_at == 12 * HOUR + 2 * HOUR
    assert forecast(5, 20, 0, 24 * HOUR, 12 * HOUR, 0).exhausted_at is None            # idle: never runs out
    assert forecast(1, 20, 0, 24 * HOUR, 23 * HOUR, 1).exhausted_at is None            # not before the reset
    assert forecast(20, 20, 0, 24 * HOUR, 12 * HOUR, 1).exhausted_at == 12 * HOUR       # spent: out now
    assert forecast(1, 20, 0, 24 * HOUR, 0.5 * HOUR, 1).burn_per_hour == 2              # a young window


async def test_a_dollar_an_hour_from_midnight_projects_24_runs_out_at_20_and_alerts_once(
        upstream, start_gateway, http, receiver, tmp_path):  # noqa: F811
    clock = FakeClock(MIDNIGHT)
    gateway = await forecasting(start_gateway, upstream, receiver, tmp_path, clock, "20")
    upstream.script(*[ONE_DOLLAR] * 12)
    for hour in range(12):                     # at half past every hour from midnight to 11:30
        clock.set(MIDNIGHT + hour * HOUR + HOUR / 2)
        assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    await gateway.app[BUDGET].settled()
    clock.set(MIDNIGHT + 12 * HOUR)

    [entry] = (await http(gateway, "GET", "/v1/budget/status", key=ADMIN_KEY)).json()["data"]
    assert entry["spent"] == "12"
    assert entry["forecast"] == {"burn_per_hour": "1", "burn_per_hour_window": "1", "projected_at_reset": "24",
                                 "exhausted_at": "2026-11-22T20:00:00+00:00"}
    assert "24 by reset, out 20:00" in render_budgets([entry])

    text = await scrape(gateway, http)
    labels = {"policy": "daily-20", "period": "daily", "unit": "usd"}
    assert value(text, "gateway_budget_burn_per_hour", **labels) == 1.0
    assert value(text, "gateway_budget_projected_at_reset", **labels) == 24.0
    assert value(text, "gateway_budget_projected_utilization", **labels) == 1.2

    forecasts, alerts = gateway.app[FORECASTS], gateway.app[ALERTS]
    assert await forecasts.check() == 1
    clock.advance(300)
    assert await forecasts.check() == 0        # the same window: not again
    await alerts.idle()
    await wait_until(lambda: len(receiver.posts) == 1)
    [post] = receiver.posts
    assert "projected to reach 24 USD of its 20 USD limit" in post["text"]
    assert "runs out at 2026-11-22T20:00:00+00:00" in post["text"]


async def test_a_window_under_its_projection_share_is_not_alerted(upstream, start_gateway, http, receiver,  # noqa: F811
                                                                  tmp_path):
    clock = FakeClock(MIDNIGHT)
    gateway = await forecasting(start_gateway, upstream, receiver, tmp_path, clock, "30")
    upstream.script(ONE_DOLLAR)
    clock.set(MIDNIGHT + HOUR / 2)
    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    clock.set(MIDNIGHT + HOUR)                 # $1 in the first hour: $24 projected of $30
    assert await gateway.app[FORECASTS].check() == 0
    [entry] = (await http(gateway, "GET", "/v1/budget/status", key=ADMIN_KEY)).json()["data"]
    assert entry["forecast"]["projected_at_reset"] == "24" and entry["forecast"]["exhausted_at"] is None
    clock.set(MIDNIGHT + 3 * HOUR)             # two idle hours: the current rate is nil, the day's average not
    [entry] = (await http(gateway, "GET", "/v1/budget/status", key=ADMIN_KEY)).json()["data"]
    assert entry["forecast"] == {"burn_per_hour": "0", "burn_per_hour_window": "0.333333333",
                                 "projected_at_reset": "1", "exhausted_at": None}
    assert receiver.posts == []
