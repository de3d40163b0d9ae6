"""Weighted splits and `auto` rules: who lands on which arm, the failover order behind it, what is charged."""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from gateway.clock import FakeClock
from gateway.config.loader import load_settings
from gateway.config.model import CallerIdentity, ModelPrice, RetryConfig, Route, RouteTarget, Settings
from gateway.config.routes import Rule, RuleWhen
from gateway.domain.pricing import Usage, cost_nano, nano_to_usd
from gateway.domain.request import ENDPOINTS, ProxyRequest
from gateway.http.appkeys import BUDGET, CONFIG
from gateway.http.auth import key_digest
from gateway.mock_upstream import Action
from gateway.routing.canary_runs import CanaryRuns
from gateway.routing.router import Router
from tests.support.canary import CANARY_KEY
from tests.support.metrics import RecordingLog, scrape, value
from tests.support.settings import CLIENT_KEY, PRICES, make_policy, make_settings

WEB = CallerIdentity("web-app", team="web", tags=("prod",))
SHORT = [{"role": "user", "content": "hi"}]
LONG = [{"role": "user", "content": "word " * 400}]
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]


def chat(model: str, **payload: Any) -> ProxyRequest:
    """A parsed chat request for the router (the body is not looked at)."""
    body = {"model": model, "messages": SHORT, **payload}
    return ProxyRequest(ENDPOINTS["chat"], b"", body, model, False, False, None)


def with_routes(settings: Settings, *routes: Route) -> Settings:
    """`settings` with `routes` in front of its own (a route named twice: the first wins)."""
    return dataclasses.replace(settings, routes=(*routes, *settings.routes))


def split_settings(weights: tuple[int, int], sticky: str = "none") -> Settings:
    split = Route("gpt-4.1", (RouteTarget("primary"), RouteTarget("backup")), weights, sticky)  # type: ignore[arg-type]
    return with_routes(make_settings({"primary": "http://127.0.0.1:1/v1", "backup": "http://127.0.0.1:2/v1"}), split)


def router(seed: int = 2026) -> Router:
    return Router(CanaryRuns(None, FakeClock()), random.Random(seed))


# --- splits: the chooser ---------------------------------------------------------------------------------------

def test_a_95_5_split_sends_5_percent_of_10000_requests_to_the_small_arm_and_keeps_the_other_for_failover() -> None:
    settings, chooser = split_settings((95, 5)), router()

    choices = [chooser.route(settings, WEB, chat("gpt-4.1"), {}) for _ in range(10_000)]

    share = Counter(choice.arm for choice in choices)["backup"] / 100
    assert 4.5 <= share <= 5.5, share
    plans = {choice.arm: [target.provider for target in choice.plan.targets] for choice in choices}
    assert plans == {"primary": ["primary", "backup"], "backup": ["backup", "primary"]}


def test_sticky_key_keeps_every_caller_on_one_arm_and_the_share_at_the_weights() -> None:
    settings, chooser = split_settings((95, 5), sticky="key"), router()
    callers = [CallerIdentity(f"key-{index}") for index in range(10_000)]

    first = [chooser.route(settings, caller, chat("gpt-4.1"), {}).arm for caller in callers]
    again = [chooser.route(settings, caller, chat("gpt-4.1"), {}).arm for caller in reversed(callers)]

    assert first == again[::-1]
    assert 4.5 <= first.count("backup") / 100 <= 5.5
    other_replica = router(seed=7)          # another replica, or a restart: the same arms
    assert [other_replica.route(settings, caller, chat("gpt-4.1"), {}).arm for caller in callers] == first


def test_sticky_user_follows_the_end_user_and_falls_back_on_the_key() -> None:
    settings, chooser = split_settings((50, 50), sticky="user"), router()

    by_user = {user: {chooser.route(settings, CallerIdentity(f"key-{k}"), chat("gpt-4.1", user=user), {}).arm
                      for k in range(20)} for user in (f"user-{n}" for n in range(200))}
    by_key = {chooser.route(settings, WEB, chat("gpt-4.1"), {}).arm for _ in range(50)}

    assert all(len(arms) == 1 for arms in by_user.values())
    assert {arm for arms in by_user.values() for arm in arms} == {"primary", "backup"}
    assert len(by_key) == 1


def test_new_weights_apply_from_the_config_that_carries_them() -> None:
    chooser = router()
    before, after = split_settings((99, 1)), split_settings((1, 99))

    shares = [Counter(chooser.route(s, WEB, chat("gpt-4.1"), {}).arm for _ in range(1000))["backup"]
              for s in (before, after)]

    assert shares[0] < 50 and shares[1] > 950


# --- splits: end to end --------------------------------------------------------------------------------------

SPLIT_YAML = """
store: {{path: {tmp}/budget.db, journal_path: {tmp}/journal.jsonl}}
providers:
  primary: {{base_url: "{primary}", api_key: "{key}"}}
  backup: {{base_url: "{backup}", api_key: "{key}"}}
routes:
  gpt-4.1:
    split: [{{provider: primary, weight: {primary_weight}}}, {{provider: backup, weight: {backup_weight}}}]
pricing:
  gpt-4.1: {{input: 2.00, output: 8.00, max_output_tokens: 100}}
keys:
  - {{name: web-app, team: web, sha256: {digest}}}
"""


def write_split(tmp_path: Path, upstream, backup_upstream, primary_weight: int, backup_weight: int) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(SPLIT_YAML.format(tmp=tmp_path, primary=upstream.url, backup=backup_upstream.url, key=CANARY_KEY,
                                      digest=key_digest(CLIENT_KEY), primary_weight=primary_weight,
                                      backup_weight=backup_weight))
    return str(path)


async def until(condition, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.02)


async def test_split_weights_reload_live(tmp_path, upstream, backup_upstream, start_gateway, http) -> None:
    path = write_split(tmp_path, upstream, backup_upstream, 999, 1)
    gateway = await start_gateway(load_settings(path), config_path=path)
    body = {"model": "gpt-4.1", "messages": SHORT, "max_tokens": 5}

    for _ in range(30):
        assert (await http(gateway, "POST", "/v1/chat/completions", json=body)).status == 200
    before = gateway.app[CONFIG].current
    write_split(tmp_path, upstream, backup_upstream, 1, 999)
    await until(lambda: gateway.app[CONFIG].current is not before)
    served = Counter()
    for _ in range(30):
        reply = await http(gateway, "POST", "/v1/chat/completions", json=body)
        served[reply.headers["x-gateway-provider"]] += 1

    assert len(upstream.requests) >= 28 and served["backup"] >= 28


async def test_a_failing_split_arm_fails_over_like_a_plain_route_with_one_charge(
        upstream, backup_upstream, start_gateway, http) -> None:
    settings = with_routes(make_settings({"primary": upstream.url, "backup": backup_upstream.url}),
                           Route("gpt-4.1", (RouteTarget("primary"), RouteTarget("backup")), (1, 1000)))
    settings = dataclasses.replace(settings, retry=RetryConfig(max_retries=1, backoff_base_s=0, backoff_cap_s=0))
    backup_upstream.always(Action(status=503))
    log = RecordingLog()
    gateway = await start_gateway(settings, access_log=log)

    reply = await http(gateway, "POST", "/v1/chat/completions", json={"model": "gpt-4.1", "messages": SHORT,
                                                                       "max_tokens": 5})

    assert reply.status == 200 and reply.headers["x-gateway-provider"] == "primary"
    assert reply.headers["x-gateway-attempts"] == "3" and len(backup_upstream.requests) == 2
    await gateway.app[BUDGET].settled()
    [line] = [orjson.loads(r.line()) for r in log.records if r.path == "/v1/chat/completions"]
    assert line["provider"] == "primary" and line["attempts"] == 3 and line["cost_usd"] is not None


# --- auto rules ------------------------------------------------------------------------------------------------

AUTO = Route("auto", (), rules=(
    Rule("deepseek-v3.2", RuleWhen(prompt_tokens_max=200, tools=False, images=False)),
    Rule("gpt-4o-mini", RuleWhen(prompt_tokens_max=4000, tools=False)),
    Rule("gpt-4.1"),
))


def test_rules_pick_by_prompt_bound_tools_images_team_tags_and_tier() -> None:
    rules = Route("auto", (), rules=(
        Rule("gpt-4o-mini", RuleWhen(tier="cheap")),
        Rule("deepseek-v3.2", RuleWhen(teams=("data",))),
        Rule("gpt-4o-mini", RuleWhen(tags=("prod",), images=True)),
        *AUTO.rules,
    ))
    settings, chooser = with_routes(make_settings({"primary": "http://127.0.0.1:1/v1"}), rules), router()
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]

    def served(caller: CallerIdentity = WEB, headers: dict[str, str] | None = None, **payload: Any) -> str:
        return chooser.route(settings, caller, chat("auto", **payload), headers or {}).plan.model

    assert served() == "deepseek-v3.2"
    assert served(messages=LONG) == "gpt-4o-mini"
    assert served(tools=TOOLS) == "gpt-4.1"
    assert served(CallerIdentity("other"), messages=image) == "gpt-4o-mini"   # an image: not deepseek's rule
    assert served(messages=image, tools=TOOLS) == "gpt-4o-mini"              # tag prod and an image
    assert served(CallerIdentity("other"), messages=image, tools=TOOLS) == "gpt-4.1"
    assert served(CallerIdentity("batch", team="data"), tools=TOOLS) == "deepseek-v3.2"
    assert served(headers={"x-gateway-tier": "cheap"}, tools=TOOLS) == "gpt-4o-mini"


GEMINI_FLASH = ModelPrice(Decimal("0.30"), Decimal("2.50"), max_output_tokens=1000)
AUTO_AS_ISSUED = Route("auto", (), rules=(       # the issue's example: deepseek, then gemini, then gpt-4.1
    Rule("deepseek-v3.2", RuleWhen(prompt_tokens_max=200, tools=False, images=False)),
    Rule("gemini-2.5-flash", RuleWhen(prompt_tokens_max=4000, tools=False)),
    Rule("gpt-4.1"),
))


async def test_auto_serves_each_prompt_by_its_rule_charged_at_that_models_price(
        upstream, start_gateway, http) -> None:
    settings = make_settings({"primary": upstream.url}, policies=(make_policy("all", usd="100"),))
    settings = with_routes(dataclasses.replace(settings, pricing={**settings.pricing, "gemini-2.5-flash": GEMINI_FLASH}),
                           AUTO_AS_ISSUED, Route("gemini-2.5-flash", (RouteTarget("primary"),)))
    prices = {**PRICES, "gemini-2.5-flash": GEMINI_FLASH}
    log = RecordingLog()
    gateway = await start_gateway(settings, access_log=log)
    asks = {"deepseek-v3.2": SHORT, "gemini-2.5-flash": LONG, "gpt-4.1": SHORT}

    for model, messages in asks.items():
        extra = {"tools": TOOLS} if model == "gpt-4.1" else {}
        reply = await http(gateway, "POST", "/v1/chat/completions",
                           json={"model": "auto", "messages": messages, "max_tokens": 5, **extra})
        assert reply.status == 200, reply.body
        assert reply.headers["x-gateway-model"] == model and reply.json()["model"] == model
        assert upstream.requests[-1].json["model"] == model

    await gateway.app[BUDGET].settled()
    lines = [orjson.loads(r.line()) for r in log.records if r.path == "/v1/chat/completions"]
    assert [(line["model"], line["requested_model"]) for line in lines] == [(m, "auto") for m in asks]
    rows = await gateway.app[BUDGET].store.ledger(0, 2**40, 10)
    text = await scrape(gateway, http)
    costs = []
    for model, line in zip(asks, lines):
        billed = upstream.billed.models[model]
        cost = nano_to_usd(cost_nano(prices[model], Usage(billed.prompt_tokens, billed.completion_tokens)))
        costs.append(cost)
        assert Decimal(line["cost_usd"]) == cost
        assert Decimal(str(value(text, "gateway_cost_usd_total", model=model, provider="primary"))) == cost
        assert value(text, "gateway_route_arm_requests_total", route="auto", arm=model) == 1
    assert sorted((row.model, nano_to_usd(row.cost_nano)) for row in rows) == sorted(zip(asks, costs))
    assert len(set(costs)) == 3                      # three prices, not one model's price three times


async def test_auto_reserves_the_chosen_models_price(upstream, start_gateway, http) -> None:
    # room for many deepseek-v3.2 worst cases (1000 output tokens at $0.42/M) but not one gpt-4.1 ($8/M)
    settings = with_routes(make_settings({"primary": upstream.url}, policies=(make_policy("all", usd="0.005"),)),
                           AUTO)
    gateway = await start_gateway(settings)
    cheap = {"model": "auto", "messages": SHORT}

    statuses = [(await http(gateway, "POST", "/v1/chat/completions", json=cheap)).status for _ in range(5)]
    dear = await http(gateway, "POST", "/v1/chat/completions", json={**cheap, "tools": TOOLS})

    assert statuses == [200] * 5
    assert dear.status == 429 and dear.json()["error"]["code"] == "budget_exceeded"
