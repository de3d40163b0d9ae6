"""Budget alerts by webhook: once across replicas, never on the request path, retried, configured in YAML."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.budget.alert_rules import Alert, alert_text, reached_alerts, webhook_payload
from gateway.budget.alerts import BACKOFF_MAX_S, LEASE_S, AlertSender
from gateway.budget.redis_store import RedisBudgetStore, create_redis_client
from gateway.budget.sqlite_store import SqliteBudgetStore
from gateway.budget.store import CounterKey, CounterState
from gateway.budget.windows import window_for
from gateway.clock import FakeClock
from gateway.config.holder import ConfigHolder
from gateway.config.loader import load_settings
from gateway.config.model import AlertConfig, Policy, StoreConfig
from gateway.domain.pricing import Charge
from gateway.http.appkeys import ALERTS, BUDGET
from tests.support.redis_server import free_port
from tests.support.sleep import VirtualTime
from tests.support.settings import ADMIN_KEY, CLIENT_KEY, OTHER_KEY, make_policy, make_settings
from tests.test_config import MINIMAL, fixture_issues, write_config

CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "Watch the budget"}], "max_tokens": 10}
NOON_UTC = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc).timestamp()


@dataclass
class Receiver:
    """A local webhook receiver: records every POST, answers the scripted statuses (then 200) or hangs."""

    url: str = ""
    posts: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    hang: bool = False
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.posts.append(await request.json())
        self.arrived.set()
        if self.hang:
            await self.release.wait()
        return web.Response(status=self.statuses.pop(0) if self.statuses else 200)


async def serve(hook: Receiver, port: int | None = None) -> TestServer:
    """Serve `hook` on loopback (on `port`, when given) and set its URL."""
    app = web.Application()
    app.router.add_post("/hook", hook.handle)
    server = TestServer(app, host="127.0.0.1", port=port)
    await server.start_server()
    hook.url = str(server.make_url("/hook"))
    return server


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hook = Receiver()
    server = await serve(hook)
    yield hook
    hook.release.set()
    await server.close()


def alerting(webhook: str, *, requests: int = 10, message_format: str = "slack", name: str = "team-web") -> Policy:
    """A daily budget of `requests` requests on team web, alerting `webhook`."""
    policy = make_policy(name, requests=requests, teams=("web",))
    return dataclasses.replace(policy, alerts=AlertConfig(webhook, message_format))  # type: ignore[arg-type]


async def never(_seconds: float) -> None:
    """A pace for sweeps the test runs itself."""
    await asyncio.Event().wait()


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Let the loop run (real sockets need real turns) until `predicate` holds."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.005)


async def send(http, gateways, count: int) -> list[int]:
    """`count` concurrent chat requests spread over `gateways`; their statuses."""
    replies = await asyncio.gather(*(http(gateways[i % len(gateways)], "POST", "/v1/chat/completions", json=CHAT)
                                     for i in range(count)))
    return [reply.status for reply in replies]


async def delivered(*gateways) -> None:
    """Wait (bounded) until every replica has settled what it answered and its alert queue is empty."""
    await asyncio.wait_for(asyncio.gather(*(gateway.app[BUDGET].settled() for gateway in gateways)), 10)
    await asyncio.wait_for(asyncio.gather(*(gateway.app[ALERTS].idle() for gateway in gateways)), 10)


def blocking_sleep() -> tuple[Callable[[float], Awaitable[None]], list[float], asyncio.Event]:
    """An injected sleep that records its delay and never returns, and an event set when it is first awaited."""
    waits: list[float] = []
    awaited = asyncio.Event()

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        awaited.set()
        await asyncio.Event().wait()

    return sleep, waits, awaited


async def test_two_replicas_crossing_70_percent_together_send_exactly_one_webhook(
        upstream, start_gateway, http, receiver, redis_url):
    settings = make_settings({"primary": upstream.url}, store=StoreConfig(url=redis_url),
                             policies=(alerting(receiver.url),))
    replicas = [await start_gateway(settings), await start_gateway(settings)]

    assert await send(http, replicas, 8) == [200] * 8
    await delivered(*replicas)

    [post] = receiver.posts
    text = post["text"]
    for part in ("team-web", "daily", "70% threshold", "of its 10 requests limit", "2026-", "resets at"):
        assert part in text
    for secret in (CLIENT_KEY, OTHER_KEY, ADMIN_KEY, "web-app"):
        assert secret not in text


async def test_each_threshold_is_announced_once_and_a_jump_announces_only_the_highest(
        upstream, start_gateway, http, receiver, redis_url):
    settings = make_settings({"primary": upstream.url}, store=StoreConfig(url=redis_url),
                             policies=(alerting(receiver.url),))
    replicas = [await start_gateway(settings), await start_gateway(settings)]
    for index in range(10):  # 7 -> 70%, 9 -> 90%, 10 -> 95% and 100% at once
        assert await send(http, [replicas[index % 2]], 1) == [200]
        await delivered(*replicas)

    thresholds = [post["text"].split(" threshold")[0].rsplit(" ", 1)[1] for post in receiver.posts]
    assert thresholds == ["70%", "90%", "100%"]
    assert receiver.posts[-1]["text"].startswith("Budget exceeded: policy 'team-web'")


async def test_discord_receives_content(upstream, start_gateway, http, receiver, tmp_path):
    settings = make_settings({"primary": upstream.url}, store=StoreConfig(path=str(tmp_path / "b.db")),
                             policies=(alerting(receiver.url, requests=1, message_format="discord"),))
    gateway = await start_gateway(settings)
    assert await send(http, [gateway], 1) == [200]
    await delivered(gateway)
    [post] = receiver.posts
    assert set(post) == {"content"} and "100% threshold" in post["content"]


async def test_a_down_receiver_delays_no_request(upstream, start_gateway, http, tmp_path):
    sleep, waits, retrying = blocking_sleep()
    closed_port = f"http://127.0.0.1:{free_port()}/hook"
    settings = make_settings({"primary": upstream.url}, store=StoreConfig(path=str(tmp_path / "b.db")),
                             policies=(alerting(closed_port),))
    gateway = await start_gateway(settings, sleep=sleep)

    assert await asyncio.wait_for(send(http, [gateway], 7), 10) == [200] * 7
    await asyncio.wait_for(retrying.wait(), 10)  # the sender failed to connect and now waits to retry
    assert await asyncio.wait_for(send(http, [gateway], 3), 10) == [200] * 3
    assert len(waits) == 1  # still in its first backoff, which never ends: no request awaited it


async def test_a_hanging_receiver_delays_no_request(upstream, start_gateway, http, receiver, tmp_path):
    receiver.hang = True
    settings = make_settings({"primary": upstream.url}, store=StoreConfig(path=str(tmp_path / "b.db")),
                             policies=(alerting(receiver.url),))
    gateway = await start_gateway(settings)

    assert await asyncio.wait_for(send(http, [gateway], 7), 10) == [200] * 7
    await asyncio.wait_for(receiver.arrived.wait(), 10)
    assert await asyncio.wait_for(send(http, [gateway], 3), 10) == [200] * 3
    assert len(receiver.posts) == 1


async def test_receiver_errors_are_retried_with_exponential_backoff(upstream, start_gateway, http, receiver,
                                                                   tmp_path):
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    receiver.statuses = [500, 503]
    settings = make_settings({"primary": upstream.url}, store=StoreConfig(path=str(tmp_path / "b.db")),
                             policies=(alerting(receiver.url, requests=1),))
    gateway = await start_gateway(settings, sleep=sleep)
    assert await send(http, [gateway], 1) == [200]
    await delivered(gateway)

    assert len(receiver.posts) == 3 and receiver.posts[0] == receiver.posts[2]
    assert 1 <= waits[0] <= 2 <= waits[1] <= 3  # 1 s, then 2 s, each plus up to 1 s of jitter


async def test_a_refusing_receiver_is_not_retried(upstream, start_gateway, http, receiver, tmp_path, caplog):
    caplog.set_level(logging.WARNING, "gateway.alerts")
    receiver.statuses = [404]
    settings = make_settings({"primary": upstream.url}, store=StoreConfig(path=str(tmp_path / "b.db")),
                             policies=(alerting(receiver.url, requests=1),))
    gateway = await start_gateway(settings)
    assert await send(http, [gateway], 1) == [200]
    await delivered(gateway)
    assert len(receiver.posts) == 1
    assert "refused by its webhook: 404" in caplog.text and receiver.url not in caplog.text


def state(policy: str, spent: Charge, now: float = NOON_UTC) -> CounterState:
    return CounterState(CounterKey(policy, "daily", window_for("daily", "UTC", now).id), spent, Charge())


async def test_a_full_queue_drops_the_alert_with_a_log_line(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "gateway.alerts")
    policies = tuple(dataclasses.replace(alerting("http://127.0.0.1:9/hook"), name=name) for name in ("a", "b"))
    store = SqliteBudgetStore(str(tmp_path / "b.db"))
    sender = AlertSender(store, ConfigHolder(make_settings({}, policies=policies)), FakeClock(NOON_UTC),
                         queue_size=1)
    sender.observe([state("a", Charge(requests=8)), state("b", Charge(requests=8))])
    sender.observe([state("a", Charge(requests=9))])  # 90% is new, but the queue is still full
    assert caplog.text.count("budget alert queue full") == 2 and "policy 'b'" in caplog.text
    await store.close()


def test_thresholds_follow_the_fullest_unit_and_only_the_current_window():
    policy = dataclasses.replace(make_policy("p", usd="10", tokens=1000),
                                 alerts=AlertConfig("http://127.0.0.1:9/hook"))
    alerts = reached_alerts(policy, state("p", Charge(usd_nano=1_000_000_000, tokens=920)), NOON_UTC)
    assert [(a.threshold, a.unit, a.spent, a.limit) for a in alerts] == [
        (Decimal("0.7"), "tokens", 920, 1000), (Decimal("0.9"), "tokens", 920, 1000)]
    assert alerts[0].key == f"p:daily:{window_for('daily', 'UTC', NOON_UTC).id}:0.7"
    assert reached_alerts(policy, state("p", Charge(tokens=999)), NOON_UTC + 86_400) == []  # that day is over


def test_the_message_names_policy_period_threshold_spent_limit_and_reset():
    resets = datetime(2026, 11, 23, tzinfo=timezone.utc)
    alert = Alert("team-web", "daily", "d2026-11-22", Decimal("0.95"), "usd", 9_500_000_000, 10_000_000_000,
                  resets, AlertConfig("https://hooks.example/secret"))
    assert alert_text(alert) == ("Budget warning: policy 'team-web' daily budget reached its 95% threshold: "
                                 "spent 9.5 USD of its 10 USD limit; the window resets at 2026-11-23T00:00:00+00:00.")
    assert webhook_payload(alert) == {"text": alert_text(alert)}


def test_policy_alerts_are_read_from_yaml_with_env_webhooks(tmp_path: Path):
    (tmp_path / "policies").mkdir()
    write_config(tmp_path, "name: p\nbudgets: [{period: daily, usd: 1}]\n"
                           "alerts: {webhook: '${SLACK_HOOK}'}\n", "policies/p.yaml")
    hook = "https://hooks.slack.com/services/T0/B0/s3cret"
    [policy] = load_settings(write_config(tmp_path, MINIMAL), env={"SLACK_HOOK": hook}).policies
    assert policy.alerts == AlertConfig(hook, "slack")
    assert hook not in repr(policy)


def test_an_alert_webhook_must_be_http(monkeypatch: pytest.MonkeyPatch):
    assert fixture_issues("policy_alert_webhook_not_http", monkeypatch) == [
        "policies/team.yaml: alerts.webhook: must be an http(s) URL"]


def test_an_unknown_alert_format_is_reported(tmp_path: Path):
    (tmp_path / "policies").mkdir()
    write_config(tmp_path, "name: p\nbudgets: [{period: daily, usd: 1}]\n"
                           "alerts: {webhook: 'https://hooks.example/x', format: teams}\n", "policies/p.yaml")
    with pytest.raises(Exception, match="alerts.format: must be one of: slack, discord"):
        load_settings(write_config(tmp_path, MINIMAL), env={})


# -- delivery: per receiver, at least once, taken over after a lease ----------------------------------

async def test_a_down_receiver_delays_only_its_own_alert_and_gets_it_once_when_back(
        upstream, start_gateway, http, receiver, tmp_path):
    clock = FakeClock(NOON_UTC)
    virtual = VirtualTime(clock)
    down = Receiver(url=f"http://127.0.0.1:{(down_port := free_port())}/hook")   # nothing listens there yet
    policies = (alerting(down.url, requests=1, name="team-down"), alerting(receiver.url, requests=1, name="team-up"))
    settings = make_settings({"primary": upstream.url}, store=StoreConfig(path=str(tmp_path / "b.db")),
                             policies=policies)
    gateway = await start_gateway(settings, clock=clock, sleep=virtual)

    assert await send(http, [gateway], 1) == [200]      # both budgets reach 100 % at once
    await asyncio.wait_for(receiver.arrived.wait(), 2)  # the healthy receiver: within 2 s, not behind the other
    await wait_until(lambda: virtual.sleepers == 1)     # the down receiver's loop waits to try again
    assert down.posts == []

    back = await serve(down, down_port)                 # it comes back, within the retry window
    try:
        await virtual.advance(BACKOFF_MAX_S + 1)
        await asyncio.wait_for(down.arrived.wait(), 2)
        await asyncio.wait_for(gateway.app[ALERTS].idle(), 5)
        await virtual.advance(LEASE_S + 1)              # its lease is over: had it not been marked delivered,
        assert await gateway.app[ALERTS].sweep() == 0   # any replica would take it over now
    finally:
        await back.close()
    [late] = down.posts
    [prompt] = receiver.posts
    assert late["text"].startswith("Budget exceeded: policy 'team-down'")
    assert prompt["text"].startswith("Budget exceeded: policy 'team-up'")


async def test_an_alert_claimed_by_a_replica_that_died_is_taken_over_after_its_lease(redis_url, receiver):
    clock = FakeClock(time.time())                      # Redis expires the alert at its window's real end
    store = RedisBudgetStore(create_redis_client(redis_url, 5.0, 4))
    config = ConfigHolder(make_settings({}, policies=(alerting(receiver.url),)))
    dying_sleep = VirtualTime(clock)
    receiver.statuses = [503]
    async with aiohttp.ClientSession() as session:
        dying = AlertSender(store, config, clock, sleep=dying_sleep, pace=never)
        dying.start(session)
        dying.observe([state("team-web", Charge(requests=7), clock.now())])
        await wait_until(lambda: dying_sleep.sleepers == 1)   # claimed, posted (503), waits to retry ...
        await dying.stop()                                    # ... and dies: never marked delivered
        [first] = receiver.posts

        taker = AlertSender(store, config, clock, sleep=VirtualTime(clock), pace=never)
        taker.start(session)
        assert await taker.sweep() == 0                       # the dead replica's lease still runs
        clock.advance(LEASE_S + 1)
        assert await taker.sweep() == 1
        await asyncio.wait_for(taker.idle(), 5)
        assert receiver.posts == [first, first]               # the stored message, delivered by the taker
        clock.advance(LEASE_S + 1)
        assert await taker.sweep() == 0                       # and marked delivered: taken over once
        await taker.stop()
    await store.close()


async def test_an_exception_in_alert_delivery_is_logged_once_counted_and_delivery_goes_on(
        upstream, start_gateway, http, receiver, tmp_path, caplog, monkeypatch):
    async def no_wait(_seconds: float) -> None:
        pass

    settings = make_settings({"primary": upstream.url}, store=StoreConfig(path=str(tmp_path / "b.db")),
                             policies=(alerting(receiver.url),))
    gateway = await start_gateway(settings, sleep=no_wait)
    store = gateway.app[BUDGET].store.wrapped
    claim, calls = store.claim_alert, []

    def claim_failing_once(*args: Any) -> Awaitable[bool]:
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return claim(*args)

    monkeypatch.setattr(store, "claim_alert", claim_failing_once)
    with caplog.at_level(logging.ERROR, logger="gateway"):
        assert await send(http, [gateway], 7) == [200] * 7     # 70 %: its delivery raises
        await delivered(gateway)
        assert receiver.posts == []
        assert await send(http, [gateway], 1) == [200]         # the next settle offers it again: the loop
        await delivered(gateway)                               # went on and delivers it

    [post] = receiver.posts
    assert "70% threshold" in post["text"]
    assert len([r for r in caplog.records if "'alert_delivery' failed (RuntimeError)" in r.getMessage()]) == 1
    metrics = (await http(gateway, "GET", "/metrics", key=None)).body.decode()
    assert 'gateway_background_failures_total{task="alert_delivery"} 1.0' in metrics
