"""One pricing rule: every target of a route is priced (its upstream model's price, else the client model's),
or the request is refused before any upstream call; the charge is the served model's price, and
`x-gateway-model` names that model. Shown on the shipped config.yaml, its providers pointed at mocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from urllib.parse import urlencode

import pytest

from gateway.config.loader import load_settings
from gateway.config.model import Settings
from gateway.domain.plan import plan_for
from gateway.domain.pricing import Usage, cost_nano, nano_to_usd
from gateway.domain.request import ENDPOINTS, ProxyRequest
from gateway.domain.worst_case import worst_case
from gateway.errors import NotFound
from gateway.http.appkeys import BUDGET
from gateway.mock_upstream import Action
from tests.support.canary import CANARY_KEY
from tests.support.metrics import RecordingLog
from tests.support.settings import ADMIN_KEY, CLIENT_KEY, OTHER_KEY, PRICES, make_settings

REPO = Path(__file__).resolve().parent.parent
ENV = {"HOLYSHEEP_API_KEY": CANARY_KEY, "OPENAI_API_KEY": CANARY_KEY, "WEB_APP_KEY": CLIENT_KEY,
       "BATCH_JOBS_KEY": OTHER_KEY, "GATEWAY_ADMIN_KEY": ADMIN_KEY}
MESSAGES = [{"role": "user", "content": "which model answered me"}]


def shipped_config(primary_url: str, backup_url: str, tmp_path: Path) -> Settings:
    """config.yaml as shipped, its two providers at the mocks and its files in tmp_path."""
    settings = load_settings(REPO / "config.yaml", env=ENV)
    urls = {"holysheep": primary_url, "openai": backup_url}
    providers = {name: dataclasses.replace(p, base_url=urls[name]) for name, p in settings.providers.items()}
    store = dataclasses.replace(settings.store, path=str(tmp_path / "gateway.db"),
                                journal_path=str(tmp_path / "journal.jsonl"))
    return dataclasses.replace(settings, providers=providers, store=store)


async def no_wait(_seconds: float) -> None:
    await asyncio.sleep(0)


async def test_an_unpriced_model_of_a_glob_route_is_refused_before_any_upstream_call(
        upstream, backup_upstream, start_gateway, http, tmp_path) -> None:
    gateway = await start_gateway(shipped_config(upstream.url, backup_upstream.url, tmp_path))

    reply = await http(gateway, "POST", "/v1/chat/completions", json={"model": "claude-opus-4", "messages": MESSAGES})

    assert reply.status == 404 and reply.json()["error"]["code"] == "model_not_found"
    assert "no price" in reply.json()["error"]["message"]
    assert upstream.hits == backup_upstream.hits == 0


async def test_a_failover_to_a_renamed_model_is_charged_and_named_as_the_served_model(
        upstream, backup_upstream, start_gateway, http, tmp_path) -> None:
    settings = shipped_config(upstream.url, backup_upstream.url, tmp_path)
    log = RecordingLog()
    gateway = await start_gateway(settings, sleep=no_wait, access_log=log)
    upstream.always(Action(status=503))
    body = {"model": "claude-sonnet-4.5", "messages": MESSAGES, "max_tokens": 20}

    reply = await http(gateway, "POST", "/v1/chat/completions", json=body)

    assert reply.status == 200
    assert (reply.headers["x-gateway-provider"], reply.headers["x-gateway-model"]) == ("openai", "gpt-4.1")
    assert backup_upstream.requests[-1].json["model"] == "gpt-4.1"
    billed = backup_upstream.billed.models["gpt-4.1"]
    used = Usage(billed.prompt_tokens, billed.completion_tokens, billed.cached_tokens)
    served_price = nano_to_usd(cost_nano(settings.pricing["gpt-4.1"], used))
    assert served_price != nano_to_usd(cost_nano(settings.pricing["claude-sonnet-4.5"], used))
    await gateway.app[BUDGET].settled()
    report = await http(gateway, "GET", "/v1/budget/usage?" + urlencode({"group_by": "model"}), key=ADMIN_KEY)
    assert [(row["group"], row["cost_usd"]) for row in report.json()["data"]] == [("gpt-4.1", str(served_price))]
    [record] = [r for r in log.records if r.path == "/v1/chat/completions"]
    assert (record.model, record.requested_model, record.provider) == ("gpt-4.1", "claude-sonnet-4.5", "openai")


def test_the_reservation_covers_the_dearest_target_the_request_may_reach(tmp_path) -> None:
    settings = shipped_config("http://127.0.0.1:1/v1", "http://127.0.0.1:2/v1", tmp_path)
    body = {"model": "claude-sonnet-4.5", "messages": MESSAGES, "max_tokens": 20}
    req = ProxyRequest(ENDPOINTS["chat"], b"", body, body["model"], False, False, 20)
    plan = plan_for(settings, "claude-sonnet-4.5")
    assert [(t.provider, t.upstream_model) for t in plan.targets] == [("holysheep", "claude-sonnet-4.5"),
                                                                       ("openai", "gpt-4.1")]
    worst = worst_case(req, plan, ())
    assert worst.amount.usd_nano == cost_nano(settings.pricing["claude-sonnet-4.5"], worst.usage) > \
        cost_nano(settings.pricing["gpt-4.1"], worst.usage)


@pytest.mark.parametrize("route", [
    [("primary", "gpt-4.1"), "backup"],            # the backup has neither its own price nor the client's
    ["primary", ("backup", "my-deployment")],      # the client model itself is unpriced
])
def test_a_route_that_cannot_price_every_target_is_refused_whole(route) -> None:
    settings = make_settings({"primary": "http://127.0.0.1:1/v1", "backup": "http://127.0.0.1:2/v1"},
                             routes={"unpriced-*": route})
    with pytest.raises(NotFound):
        plan_for(settings, "unpriced-model")


def test_a_target_without_its_own_price_is_charged_the_client_models() -> None:
    settings = make_settings({"primary": "http://127.0.0.1:1/v1", "backup": "http://127.0.0.1:2/v1"},
                             routes={"gpt-4.1": ["primary", ("backup", "my-deployment")]})
    plan = plan_for(settings, "gpt-4.1")
    assert [(t.upstream_model, t.price) for t in plan.targets] == [("gpt-4.1", PRICES["gpt-4.1"]),
                                                                    ("my-deployment", PRICES["gpt-4.1"])]
