"""The spend ledger through the real gateway: totals equal the counters, usage reports, CSV export, scoping."""

from __future__ import annotations

import asyncio
import csv
import io
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from gateway import cli
from gateway.budget.journal import SpendJournal
from gateway.budget.sqlite_store import SqliteBudgetStore
from gateway.budget.store import CounterKey, LedgerEntry
from gateway.budget.usage import GROUPS
from gateway.clock import FakeClock
from gateway.config.model import ApiKey, CallerIdentity, StoreConfig
from gateway.domain.pricing import Charge, Usage, cost_nano, nano_to_usd
from gateway.http.appkeys import BUDGET
from gateway.http.auth import key_digest
from gateway.mock_upstream import Action
from gateway.usage_cli import COLUMNS
from tests.support.settings import ADMIN_KEY, CLIENT_KEY, OTHER_KEY, PRICES, make_policy, make_settings

MESSAGES = [{"role": "user", "content": "Count the ledger"}]
CHAT = {"model": "gpt-4.1", "messages": MESSAGES, "max_tokens": 10}
MINI = {**CHAT, "model": "gpt-4o-mini"}
NOON_UTC = datetime(2026, 11, 22, 12, 0, tzinfo=timezone.utc).timestamp()
LIMITS: dict[str, Any] = {"usd": "100", "tokens": 10_000_000, "requests": 100_000}
POLICIES = (make_policy("global", **LIMITS), make_policy("team-web", teams=("web",), **LIMITS),
            make_policy("team-data", teams=("data",), **LIMITS))


async def usage(http, gateway, key: str = ADMIN_KEY, **query: str) -> dict[str, Any]:
    reply = await http(gateway, "GET", "/v1/budget/usage?" + urlencode(query), key=key)
    assert reply.status == 200, reply.body
    return reply.json()


def by_group(body: dict[str, Any]) -> dict[str | None, dict[str, Any]]:
    return {entry["group"]: entry for entry in body["data"]}


def billed_usd(upstream, model: str) -> Decimal:
    billed = upstream.billed.models[model]
    return nano_to_usd(cost_nano(PRICES[model], Usage(billed.prompt_tokens, billed.completion_tokens,
                                                      billed.cached_tokens)))


async def serve_mixed_traffic(http, gateway) -> None:
    """web-app (team web) asks gpt-4.1 three times, batch (team data) asks gpt-4o-mini twice."""
    for key, body in [(CLIENT_KEY, CHAT)] * 3 + [(OTHER_KEY, MINI)] * 2:
        assert (await http(gateway, "POST", "/v1/chat/completions", json=body, key=key)).status == 200


async def test_ledger_totals_per_policy_equal_the_budget_counters(upstream, start_gateway, http, store_config):
    settings = make_settings({"primary": upstream.url}, store=store_config, policies=POLICIES)
    replicas = [await start_gateway(settings), await start_gateway(settings)]
    upstream.script(*[Action(status=400)] * 5)  # five requests fail: released, ledgered at zero cost
    calls = [(CLIENT_KEY, CHAT), (OTHER_KEY, MINI), (CLIENT_KEY, MINI), (OTHER_KEY, CHAT)]
    replies = await asyncio.gather(*(
        http(replicas[i % 2], "POST", "/v1/chat/completions", json=calls[i % 4][1], key=calls[i % 4][0])
        for i in range(100)))
    assert sorted(reply.status for reply in replies).count(200) == 95
    for replica in replicas:   # each replica settles in the background after answering
        await replica.app[BUDGET].settled()

    status = (await http(replicas[0], "GET", "/v1/budget/status", key=ADMIN_KEY)).json()["data"]
    spent = {(e["policy"], e["unit"]): e["spent"] for e in status}
    for name, row in by_group(await usage(http, replicas[1], group_by="policy")).items():
        assert Decimal(row["cost_usd"]) == Decimal(spent[(name, "usd")]) > 0
        assert row["prompt_tokens"] + row["completion_tokens"] == spent[(name, "tokens")]
        assert row["requests"] == spent[(name, "requests")]
    assert spent[("global", "requests")] == 95
    store = replicas[0].app[BUDGET].store
    rows = await store.ledger(0, 2**40, 1000)
    assert len(rows) == len({row.request_id for row in rows}) == 100
    assert sorted(row.status for row in rows).count("failed") == 5


@pytest.mark.parametrize("group_by", GROUPS)
async def test_usage_groups_by_each_option(upstream, start_gateway, http, store_config, group_by):
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store_config, policies=POLICIES))
    await serve_mixed_traffic(http, gateway)

    body = await usage(http, gateway, group_by=group_by)

    expected = {"model": {"gpt-4.1", "gpt-4o-mini"}, "key": {"web-app", "batch"}, "team": {"web", "data"},
                "provider": {"primary"}, "policy": {"global", "team-web", "team-data"}, "endpoint": {"chat"},
                "user": {None}, "session": {None}}[group_by]   # (end users: tests/test_end_users.py)
    groups = by_group(body)
    assert body["group_by"] == group_by and set(groups) == expected
    total = body["total"]
    assert total["requests"] == 5
    assert Decimal(total["cost_usd"]) == billed_usd(upstream, "gpt-4.1") + billed_usd(upstream, "gpt-4o-mini")
    if group_by != "policy":  # a row counts once per policy it was charged to
        for column in ("requests", "prompt_tokens", "completion_tokens", "cached_tokens"):
            assert sum(row[column] for row in groups.values()) == total[column]
        assert sum(Decimal(row["cost_usd"]) for row in groups.values()) == Decimal(total["cost_usd"])
    if group_by == "model":
        assert Decimal(groups["gpt-4.1"]["cost_usd"]) == billed_usd(upstream, "gpt-4.1")


async def test_a_client_key_sees_only_its_own_rows_and_policies(upstream, start_gateway, http, store_config):
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store_config, policies=POLICIES))
    await serve_mixed_traffic(http, gateway)

    mine = await usage(http, gateway, key=CLIENT_KEY, group_by="key")
    assert set(by_group(mine)) == {"web-app"} and mine["total"]["requests"] == 3
    assert set(by_group(await usage(http, gateway, key=CLIENT_KEY, group_by="policy"))) == {"global", "team-web"}
    assert set(by_group(await usage(http, gateway, key=OTHER_KEY, group_by="model"))) == {"gpt-4o-mini"}
    assert (await usage(http, gateway, key=OTHER_KEY, group_by="team"))["total"]["requests"] == 2


async def test_usage_takes_iso_or_epoch_times_and_defaults_to_this_month(upstream, start_gateway, http,
                                                                        store_config):
    clock = FakeClock(NOON_UTC)
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store_config,
                                                policies=POLICIES), clock=clock)
    for _ in range(2):
        assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    clock.advance(86_400)
    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200

    def requests(body: dict[str, Any]) -> int:
        return body["total"]["requests"]

    assert requests(await usage(http, gateway, since=str(NOON_UTC), until=str(NOON_UTC + 3600))) == 2
    assert requests(await usage(http, gateway, since="2026-11-23T00:00:00Z")) == 1
    assert requests(await usage(http, gateway, since="2026-11-23", until="2026-11-23T12:00:00+00:00")) == 0
    default = await usage(http, gateway)
    assert requests(default) == 3 and default["since"] == "2026-11-01T00:00:00+00:00"
    for query in ({"since": "yesterday"}, {"group_by": "colour"}, {"since": "2", "until": "1"}):
        reply = await http(gateway, "GET", "/v1/budget/usage?" + urlencode(query), key=ADMIN_KEY)
        assert reply.status == 400 and reply.json()["error"]["param"] == next(iter(query))


async def test_a_failed_request_leaves_a_zero_cost_row_and_no_request(upstream, start_gateway, http, store_config):
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store_config, policies=POLICIES))
    upstream.script(Action(status=400))
    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 400

    [row] = await gateway.app[BUDGET].store.ledger(0, 2**40, 10)
    assert (row.status, row.cost_nano, row.caller, row.team, row.model) == ("failed", 0, "web-app", "web", "gpt-4.1")
    assert row.policies == ("global", "team-web")
    assert (await usage(http, gateway))["total"] == {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                                     "cached_tokens": 0, "cache_write_tokens": 0, "cost_usd": "0",
                                                     "cache_hits": 0,
                                                     "saved_usd": "0"}


async def test_csv_export_has_a_header_and_one_row_per_group(upstream, start_gateway, http, capsys, tmp_path):
    store = StoreConfig(path=str(tmp_path / "budget.db"))
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store, policies=POLICIES))
    await serve_mixed_traffic(http, gateway)
    capsys.readouterr()

    args = ["usage", "--url", gateway.url, "--key", ADMIN_KEY, "--group-by", "team"]
    assert await asyncio.to_thread(cli.main, [*args, "--csv"]) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))

    assert rows[0] == ["team", *COLUMNS]
    assert sorted(row[0] for row in rows[1:]) == ["data", "web"]
    web = next(row for row in rows[1:] if row[0] == "web")
    assert int(web[1]) == 3 and Decimal(web[5]) == billed_usd(upstream, "gpt-4.1")
    assert await asyncio.to_thread(cli.main, args) == 0
    table = capsys.readouterr().out
    assert "TOTAL" in table and "COST USD" in table and "web" in table


FORMULA_TEAMS = ('=HYPERLINK("https://evil.example","open")', "+1+1", "-1+1", "@SUM(A1:A9)", "\tx", "\rx")


async def test_csv_cells_that_would_start_a_formula_are_text(upstream, start_gateway, http, capsys, tmp_path):
    keys = tuple(ApiKey(key_digest(f"sk-formula-{index}"), CallerIdentity(f"caller-{index}", team=team))
                 for index, team in enumerate(FORMULA_TEAMS))
    store = StoreConfig(path=str(tmp_path / "budget.db"))
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store, keys=keys,
                                                policies=(make_policy("global", **LIMITS),)))
    for index in range(len(keys)):
        reply = await http(gateway, "POST", "/v1/chat/completions", json=CHAT, key=f"sk-formula-{index}")
        assert reply.status == 200
    capsys.readouterr()

    args = ["usage", "--url", gateway.url, "--key", ADMIN_KEY, "--group-by", "team", "--csv"]
    assert await asyncio.to_thread(cli.main, args) == 0
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))

    assert sorted(row[0] for row in rows[1:]) == sorted("'" + team for team in FORMULA_TEAMS)
    assert all(row[1] == "1" for row in rows[1:])   # numbers stay numbers


async def test_journaled_spend_replays_with_its_ledger_row_and_old_lines_still_replay(tmp_path: Path):
    clock = FakeClock(NOON_UTC)
    store = SqliteBudgetStore(str(tmp_path / "budget.db"))
    journal = SpendJournal(tmp_path / "journal.jsonl")
    key = CounterKey("global", "daily", "d2026-11-22")
    row = LedgerEntry(NOON_UTC, "new", "web-app", "web", ("global",), "gpt-4.1", "primary", 5, 2, 0, 900,
                      "served", 12, 1)
    journal.append("new", [(key, Charge(900, 7, 1), NOON_UTC + 86_400)], row)
    with open(journal.path, "ab") as old:  # written before the ledger existed: no "entry"
        old.write(b'{"id":"old","lines":[["global","daily","d2026-11-22",100,1,1,%d]]}\n' % (NOON_UTC + 86_400))
    try:
        assert await journal.replay(store, clock.now()) == 2
        assert await store.ledger(0, 2**40, 10) == [row]
        [state] = await store.read([key], clock.now())
        assert state.spent == Charge(1000, 8, 2)
    finally:
        await store.close()
