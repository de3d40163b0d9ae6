"""Usage is read or it is unknown, never zero; and never charged beyond what the request reserved.

An upstream (often a relay) may report usage as floats, strings, bools, lists, negatives, null, 1e30, zeros,
more than the request could use, or not at all. Each answered request must still be charged more than $0
and no more than its reservation, and the access log, the ledger and a metric must say it was estimated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from gateway.domain.pricing import Usage, cost_nano, nano_to_usd
from gateway.domain.tokens import prompt_upper_bound
from gateway.http.appkeys import BUDGET
from gateway.mock_upstream import Action
from gateway.upstream.usage import UNREADABLE, usage_from
from tests.support.metrics import RecordingLog, scrape, value
from tests.support.settings import ADMIN_KEY, PRICES, make_policy, make_settings

CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "what did that cost"}], "max_tokens": 7}
WORST_USD = nano_to_usd(cost_nano(PRICES["gpt-4.1"], Usage(prompt_upper_bound(CHAT), CHAT["max_tokens"])))
Garble = Callable[[dict[str, Any]], Any]   # the real usage -> what the upstream reports

# name: (what the upstream reports, why the usage is unknown: None when it is read exactly)
VARIANTS: dict[str, tuple[Garble, str | None]] = {
    "integral floats": (lambda real: {name: float(real[name]) for name in
                                      ("prompt_tokens", "completion_tokens", "total_tokens")}, None),
    "fractional float": (lambda real: {"completion_tokens": real["completion_tokens"] + 0.5}, "unreadable"),
    "string": (lambda real: {"prompt_tokens": str(real["prompt_tokens"])}, "unreadable"),
    "bool": (lambda real: {"completion_tokens": True}, "unreadable"),
    "list": (lambda real: {"prompt_tokens": [real["prompt_tokens"]]}, "unreadable"),
    "negative": (lambda real: {"completion_tokens": -real["completion_tokens"]}, "unreadable"),
    "null": (lambda real: {"prompt_tokens": None}, "unreadable"),
    "1e30": (lambda real: {"completion_tokens": 1e30}, "unreadable"),
    "zeros": (lambda real: {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}, "unreadable"),
    "not an object": (lambda real: "lots", "unreadable"),
    "over reserved": (lambda real: {"completion_tokens": 50_000}, "over_reserved"),
    "missing": (lambda real: None, "missing"),
}


def action_for(garble: Garble, real: dict[str, Any]) -> Action:
    reported = garble(real)
    return Action(omit_usage=True) if reported is None else Action(usage=reported)


async def spent_usd(http, gateway) -> Decimal:
    await gateway.app[BUDGET].settled()
    reply = await http(gateway, "GET", "/v1/budget/status", key=ADMIN_KEY)
    [entry] = [e for e in reply.json()["data"] if e["unit"] == "usd"]
    assert Decimal(entry["reserved"]) == 0
    return Decimal(entry["spent"])


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("variant", VARIANTS)
async def test_odd_usage_is_charged_more_than_zero_and_at_most_the_reservation(
        upstream, start_gateway, http, variant: str, stream: bool) -> None:
    log = RecordingLog()
    gateway = await start_gateway(make_settings({"primary": upstream.url}, policies=(make_policy("g", usd="10"),)),
                                  access_log=log)
    garble, unknown = VARIANTS[variant]
    body = {**CHAT, "stream": stream}
    real = upstream.usage_for(body)
    upstream.script(action_for(garble, real))

    reply = await http(gateway, "POST", "/v1/chat/completions", json=body)

    assert reply.status == 200
    spent = await spent_usd(http, gateway)
    assert 0 < spent <= WORST_USD
    [record] = [r for r in log.records if r.path == "/v1/chat/completions"]
    assert record.usage_unknown == unknown and record.usage is not None
    assert record.usage.estimated is (unknown is not None)
    if unknown is None:
        assert spent == nano_to_usd(cost_nano(PRICES["gpt-4.1"], Usage(real["prompt_tokens"],
                                                                     real["completion_tokens"])))
    elif not stream or unknown == "over_reserved":
        assert spent == WORST_USD                # the reservation's own worst case, nothing recomputed
    [row] = await gateway.app[BUDGET].store.ledger(0, 2**40, 10)
    assert row.usage_estimated is (unknown is not None)
    text = await scrape(gateway, http)
    for reason in ("missing", "unreadable", "over_reserved"):
        assert value(text, "gateway_usage_unknown_total", provider="primary", reason=reason) == (
            1.0 if unknown == reason else None)

async def test_unknown_usage_is_logged_as_a_warning_without_the_upstream_values(upstream, start_gateway, http,
                                                                               caplog) -> None:
    gateway = await start_gateway(make_settings({"primary": upstream.url}))
    upstream.script(Action(usage={"prompt_tokens": "sk-looks-like-a-secret"}))
    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    [warning] = [r for r in caplog.records if r.name == "gateway" and "unreadable usage" in r.getMessage()]
    assert "primary" in warning.getMessage() and "sk-looks" not in warning.getMessage()


@pytest.mark.parametrize(("block", "read"), [
    ({"prompt_tokens": 500.0, "completion_tokens": 20, "total_tokens": 520}, Usage(500, 20)),
    ({"prompt_tokens": 8, "total_tokens": 8}, Usage(8, 0)),                       # embeddings
    ({"total_tokens": 9}, Usage(9, 0)),                                            # a total-only block
    ({"prompt_tokens": 9, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4.0}}, Usage(9, 3, 4)),
    ({"prompt_tokens": 9, "completion_tokens": 3, "prompt_cache_hit_tokens": 5}, Usage(9, 3, 5)),
    ({"prompt_tokens": 9, "completion_tokens": 3, "prompt_tokens_details": None}, Usage(9, 3)),
    ({"prompt_tokens": 9}, UNREADABLE),                                            # completion unknowable
    ({"prompt_tokens": 9, "total_tokens": 4}, UNREADABLE),
    ({"prompt_tokens": 9, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": "4"}}, UNREADABLE),
    ({"prompt_tokens": 2**53, "completion_tokens": 3}, UNREADABLE),
    ({}, UNREADABLE),
    ([], UNREADABLE),
    (None, None),
])
def test_a_usage_block_is_read_exactly_or_not_at_all(block: Any, read: Any) -> None:
    assert usage_from({"usage": block}) == read


async def test_unknown_usage_is_charged_what_was_reserved_with_the_policy_output_cap(upstream, start_gateway,
                                                                                    http) -> None:
    policy = dataclasses.replace(make_policy("g", usd="10"), max_output_tokens=5)
    gateway = await start_gateway(make_settings({"primary": upstream.url}, policies=(policy,)))
    upstream.script(Action(omit_usage=True))
    body = {key: value for key, value in CHAT.items() if key != "max_tokens"}

    assert (await http(gateway, "POST", "/v1/chat/completions", json=body)).status == 200

    # the reservation's own amount (5 output tokens, the policy's cap), not the model's cap of 1000
    assert await spent_usd(http, gateway) == nano_to_usd(cost_nano(PRICES["gpt-4.1"],
                                                                   Usage(prompt_upper_bound(body), 5)))


async def test_without_a_policy_the_worst_case_still_bounds_the_charge(upstream, start_gateway, http) -> None:
    log = RecordingLog()
    gateway = await start_gateway(make_settings({"primary": upstream.url}), access_log=log)
    upstream.script(Action(usage={"completion_tokens": 10**9}))

    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200

    [record] = log.records
    assert record.usage_unknown == "over_reserved"
    assert nano_to_usd(record.cost_nano) == WORST_USD
