"""Canaries: the state machine, its ramp and rollback through the store, replicas that agree, what status shows."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from decimal import Decimal

import orjson
import pytest

from gateway.budget.canary_record import PROMOTED, RAMPING, ROLLED_BACK, ArmTally, CanaryRecord
from gateway.budget.sqlite_store import SqliteBudgetStore
from gateway.clock import FakeClock
from gateway.config.model import AlertConfig, CallerIdentity, RetryConfig, Route, RouteTarget, Settings, StoreConfig
from gateway.config.routes import CanaryConfig, PromoteAfter, RollbackIf
from gateway.http.appkeys import ALERTS, BUDGET, ROUTER
from gateway.mock_upstream import Action
from gateway.routing import canary_runs
from gateway.routing.canary import decide, percent
from gateway.routing.canary_runs import CanaryRuns
from gateway.routing.latency import bucket_of
from gateway.routing.router import Router
from gateway.status_cli import render_canaries
from tests.support.metrics import RecordingLog, scrape, value
from tests.support.settings import ADMIN_KEY, make_policy, make_settings
from tests.test_alerts import receiver  # noqa: F401  (the webhook receiver fixture)
from tests.test_routing import chat, with_routes

MODEL = "deepseek-v3.2"
WEB = CallerIdentity("web-app", team="web")
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "move me"}], "max_tokens": 5}
START = 1_767_225_600.0


def canary(steps: tuple[int, ...] = (5, 20, 50, 100), requests: int = 100, minutes: float = 10,
           **rollback: object) -> CanaryConfig:
    return CanaryConfig(RouteTarget("primary"), RouteTarget("backup"), steps, PromoteAfter(requests, minutes),
                        RollbackIf(**rollback) if rollback else RollbackIf())   # type: ignore[arg-type]


def canary_settings(config: CanaryConfig, urls: dict[str, str] | None = None, **overrides: object) -> Settings:
    urls = urls or {"primary": "http://127.0.0.1:1/v1", "backup": "http://127.0.0.1:2/v1"}
    route = Route(MODEL, (config.control, config.candidate), canary=config)
    return with_routes(make_settings(urls, **overrides), route)


def tally(requests: int, errors: int = 0, cost_nano: int = 1000, latency_s: float = 0.1) -> ArmTally:
    return ArmTally(requests, errors, cost_nano * (requests - errors), ((bucket_of(latency_s), requests - errors),))


# --- the state machine, pure ---------------------------------------------------------------------------------

def test_a_step_is_promoted_only_when_both_requests_and_minutes_hold() -> None:
    config = canary()
    few = CanaryRecord(0, RAMPING, START, (tally(2000), tally(99)))
    enough = few._replace(arms=(tally(2000), tally(100)))

    assert decide(config, few, START + 3600) is None
    assert decide(config, enough, START + 599) is None
    assert decide(config, enough, START + 600) == (1, RAMPING, "step 5% passed")
    assert decide(config, CanaryRecord(2, RAMPING, START, (tally(100), tally(100))), START + 600)[:2] == (3, PROMOTED)


@pytest.mark.parametrize(("candidate", "reason"), [
    (tally(100, errors=6), "candidate error rate 6.0% over 5.0%"),
    (tally(100, errors=5), None),
    (tally(100, latency_s=0.2), "candidate p95 latency 2.00x the control's (limit 1.5x)"),
    (tally(100, latency_s=0.14), None),
    (tally(100, cost_nano=1300), "candidate cost per request 1.30x the control's (limit 1.2x)"),
    (tally(100, cost_nano=1100), None),
])
def test_rollback_if_judges_errors_latency_and_cost_against_the_control(candidate: ArmTally,
                                                                        reason: str | None) -> None:
    record = CanaryRecord(0, RAMPING, START, (tally(2000, latency_s=0.1), candidate))

    move = decide(canary(), record, START)

    assert (move.reason if move is not None else None) == reason


def test_rollback_waits_for_enough_candidate_requests_and_final_states_never_move() -> None:
    config = canary()                         # judged from 100 // 5 = 20 candidate requests
    early = CanaryRecord(0, RAMPING, START, (tally(400), tally(19, errors=5)))

    assert decide(config, early, START + 3600) is None
    assert decide(config, early._replace(arms=(tally(400), tally(20, errors=5))), START)[1] == ROLLED_BACK
    for status in (PROMOTED, ROLLED_BACK):
        final = CanaryRecord(1, status, START, (tally(400), tally(400, errors=400)))
        assert decide(config, final, START + 10**6) is None
    assert percent(config, CanaryRecord(1, ROLLED_BACK, START)) == 0
    assert percent(config, CanaryRecord(3, PROMOTED, START)) == 100


# --- ramping through the store -------------------------------------------------------------------------------

async def test_a_healthy_candidate_promotes_through_every_step_and_a_restart_keeps_the_step(tmp_path) -> None:
    clock, store = FakeClock(START), SqliteBudgetStore(str(tmp_path / "gateway.db"))
    settings = canary_settings(canary())
    router = Router(CanaryRuns(store, clock), random.Random(1))
    await router.canaries.sync(settings)
    seen: list[tuple[int, float]] = []
    try:
        for _ in range(4):
            run = router.canaries.runs(settings)[0]
            if run.record.status == PROMOTED:
                break
            arms = [0, 0]
            while arms[1] < 100:
                choice = router.route(settings, WEB, chat(MODEL), {})
                arms[choice.arm_index] += 1
                choice.run.observe(choice, choice.plan.targets[0].provider, 1000, 0.1)
            seen.append((run.percent, arms[1] / sum(arms)))
            step = run.record.step
            await router.canaries.sync(settings)
            assert run.record.step == step                 # the minutes have not passed
            clock.advance(600)
            await router.canaries.sync(settings)
            assert run.record.step == step + 1

        assert [share for share, _ in seen] == [5, 20, 50]
        assert all(abs(got - share / 100) < 0.07 for share, got in seen), seen
        [run] = router.canaries.runs(settings)
        assert (run.record.status, run.percent) == (PROMOTED, 100)
        assert {router.route(settings, WEB, chat(MODEL), {}).arm for _ in range(50)} == {"candidate"}

        restarted = Router(CanaryRuns(store, clock))
        await restarted.canaries.sync(settings)
        assert restarted.canaries.runs(settings)[0].record[:2] == (3, PROMOTED)
    finally:
        await store.close()


async def test_a_changed_canary_config_starts_again_at_the_first_step(tmp_path) -> None:
    clock, store = FakeClock(START), SqliteBudgetStore(str(tmp_path / "gateway.db"))
    runs = CanaryRuns(store, clock)
    first, edited = canary_settings(canary()), canary_settings(canary(requests=50))
    await runs.sync(first)
    [run] = runs.runs(first)
    assert await store.canary_move(run.id, 0, 0, ROLLED_BACK, clock.now(), clock.now() + 60)
    await runs.sync(first)
    assert run.percent == 0

    await runs.sync(edited)

    [again] = runs.runs(edited)
    assert (again.record.step, again.record.status, again.percent) == (0, RAMPING, 5)
    await store.close()


# --- end to end ------------------------------------------------------------------------------------------------

def served_by(reply) -> str:
    assert reply.status == 200, reply.body
    return reply.headers["x-gateway-provider"]


async def test_a_candidate_failing_10_percent_rolls_back_in_the_first_step_alerts_once_and_stays(
        upstream, backup_upstream, start_gateway, http, receiver, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setattr(canary_runs, "SYNC_INTERVAL_S", 3600.0)   # this test syncs itself
    clock = FakeClock(START)
    policy = dataclasses.replace(make_policy("global", requests=10**6), alerts=AlertConfig(receiver.url))
    # latency is not judged: two loopback mocks on a shared machine differ by noise, not by the candidate
    settings = canary_settings(canary(steps=(20, 50, 100), requests=40, p95_latency_ratio=None),
                               {"primary": upstream.url, "backup": backup_upstream.url},
                               policies=(policy,), retry=RetryConfig(max_retries=0))
    backup_upstream.script(*([Action(status=500)] + [Action()] * 9) * 30)   # every 10th candidate call fails
    gateway = await start_gateway(settings, clock=clock)
    runs = gateway.app[ROUTER].canaries

    served = []
    while runs.runs(settings)[0].record.status == RAMPING:
        for _ in range(10):
            served.append(served_by(await http(gateway, "POST", "/v1/chat/completions", json=CHAT)))
        await gateway.app[BUDGET].settled()
        await runs.sync(settings)
        assert len(backup_upstream.requests) < 40, "not rolled back within the first step's requests"
    [run] = runs.runs(settings)
    assert (run.record.status, run.percent) == (ROLLED_BACK, 0)
    assert "backup" in served                   # every request answered (served_by): a failed call by control

    calls = len(backup_upstream.requests)
    for _ in range(30):
        assert served_by(await http(gateway, "POST", "/v1/chat/completions", json=CHAT)) == "primary"
    clock.advance(3600)
    await runs.sync(settings)
    await asyncio.wait_for(gateway.app[ALERTS].idle(), 10)

    assert len(backup_upstream.requests) == calls and run.record.status == ROLLED_BACK
    [post] = receiver.posts
    assert post["text"].startswith(f"Canary rolled back: route '{MODEL}' sends 100% to its control 'primary'")
    assert "candidate error rate" in post["text"] and "until the canary's config changes" in post["text"]


async def test_a_failing_canary_arm_fails_over_with_one_charge(
        upstream, backup_upstream, start_gateway, http, monkeypatch) -> None:
    monkeypatch.setattr(canary_runs, "SYNC_INTERVAL_S", 3600.0)
    settings = canary_settings(canary(steps=(100,)), {"primary": upstream.url, "backup": backup_upstream.url},
                               policies=(make_policy("global", usd="10"),),
                               retry=RetryConfig(max_retries=1, backoff_base_s=0, backoff_cap_s=0))
    backup_upstream.always(Action(status=503))
    log = RecordingLog()
    gateway = await start_gateway(settings, access_log=log)

    reply = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)

    assert served_by(reply) == "primary" and reply.headers["x-gateway-attempts"] == "3"
    await gateway.app[BUDGET].settled()
    rows = await gateway.app[BUDGET].store.ledger(0, 2**40, 10)
    assert [(row.provider, row.status, row.attempts) for row in rows] == [("primary", "served", 3)]


async def test_two_replicas_on_one_redis_agree_on_the_step_and_a_restart_resumes_it(
        upstream, backup_upstream, start_gateway, http, redis_url, monkeypatch) -> None:
    monkeypatch.setattr(canary_runs, "SYNC_INTERVAL_S", 3600.0)
    clock = FakeClock(START)
    settings = canary_settings(canary(steps=(20, 50, 100), requests=5, minutes=1, p95_latency_ratio=None),
                               {"primary": upstream.url, "backup": backup_upstream.url},
                               store=StoreConfig(url=redis_url, reserve_ahead=False))
    # seeded arms: every step's requests give the candidate its 5 (at random, 40 at 20% fall short 8% of runs)
    replicas = [await start_gateway(settings, clock=clock, rng=random.Random(seed)) for seed in (1, 2)]

    async def status(gateway) -> tuple[int, str, int]:
        [entry] = (await http(gateway, "GET", "/v1/providers/status", key=ADMIN_KEY)).json()["canaries"]
        return entry["step"], entry["status"], entry["candidate_percent"]

    async def agreed() -> tuple[int, str, int]:
        seen = [await status(gateway) for gateway in replicas]
        for gateway in replicas:
            await gateway.app[ROUTER].canaries.sync(settings)
        cached = {gateway.app[ROUTER].canaries.runs(settings)[0].percent for gateway in replicas}
        assert len(set(seen)) == 1 and cached == {seen[0][2]}, (seen, cached)
        return seen[0]

    steps = [await agreed()]
    while steps[-1][1] == RAMPING:
        for index in range(40):
            await http(replicas[index % 2], "POST", "/v1/chat/completions", json=CHAT)
        for gateway in replicas:
            await gateway.app[BUDGET].settled()
            await gateway.app[ROUTER].canaries.sync(settings)   # each tallies; neither moves before the minute
        assert await agreed() == steps[-1]
        clock.advance(60)
        await replicas[len(steps) % 2].app[ROUTER].canaries.sync(settings)   # one replica moves it
        steps.append(await agreed())

    assert steps == [(1, RAMPING, 20), (2, RAMPING, 50), (3, PROMOTED, 100)]
    restarted = await start_gateway(settings, clock=clock)     # reads the step before it serves
    assert restarted.app[ROUTER].canaries.runs(settings)[0].percent == 100
    assert await status(restarted) == steps[-1]


async def test_status_metrics_and_gateway_status_show_the_step_and_each_arm(
        upstream, backup_upstream, start_gateway, http, monkeypatch) -> None:
    monkeypatch.setattr(canary_runs, "SYNC_INTERVAL_S", 3600.0)
    settings = canary_settings(canary(steps=(50, 100), requests=1000),
                               {"primary": upstream.url, "backup": backup_upstream.url})
    gateway = await start_gateway(settings)
    for _ in range(20):
        await http(gateway, "POST", "/v1/chat/completions", json=CHAT)
    await gateway.app[BUDGET].settled()
    await gateway.app[ROUTER].canaries.sync(settings)

    [entry] = (await http(gateway, "GET", "/v1/providers/status", key=ADMIN_KEY)).json()["canaries"]
    text = await scrape(gateway, http)

    arms = entry["arms"]
    assert (entry["route"], entry["step"], entry["candidate_percent"], entry["status"]) == (MODEL, 1, 50, RAMPING)
    assert arms["control"]["requests"] + arms["candidate"]["requests"] == 20
    assert arms["candidate"]["error_rate"] == 0 and arms["candidate"]["p95_latency_s"] > 0
    assert Decimal(arms["candidate"]["cost_per_request_usd"]) > 0
    assert value(text, "gateway_canary_candidate_percent", route=MODEL) == 50
    assert value(text, "gateway_canary_state", route=MODEL) == 0
    for arm in ("control", "candidate"):
        assert value(text, "gateway_canary_arm_requests", route=MODEL, arm=arm) == arms[arm]["requests"]
        assert value(text, "gateway_route_arm_requests_total", route=MODEL, arm=arm) == arms[arm]["requests"]
    table = render_canaries([entry])
    assert "candidate backup" in table and "1/2 (50%)" in table and "ramping" in table
    assert orjson.dumps(entry).find(b"http") == -1          # providers by name only, never a URL


def test_a_sticky_canary_keeps_each_caller_on_its_arm_while_the_step_stands() -> None:
    config = canary(steps=(20, 50, 100))
    route = Route(MODEL, (config.control, config.candidate), sticky="key", canary=config)
    settings = with_routes(make_settings({"primary": "http://127.0.0.1:1/v1", "backup": "http://127.0.0.1:2/v1"}),
                           route)
    router = Router(CanaryRuns(None, FakeClock(START)))
    callers = [CallerIdentity(f"key-{index}") for index in range(2000)]
    [run] = router.canaries.runs(settings)
    arms: dict[int, list[str | None]] = {}
    for step in (0, 1):
        run.adopt(CanaryRecord(step, RAMPING, START))
        arms[step] = [router.route(settings, caller, chat(MODEL), {}).arm for caller in callers]
        assert arms[step] == [router.route(settings, caller, chat(MODEL), {}).arm for caller in callers]

    assert 0.17 < arms[0].count("candidate") / 2000 < 0.23 and 0.47 < arms[1].count("candidate") / 2000 < 0.53
    moved = [before for before, after in zip(arms[0], arms[1]) if before != after]
    assert set(moved) == {"control"}           # a larger step only moves callers from control to candidate
