"""/v1/responses (OpenAI's Responses API) and /v1/messages (Anthropic's Messages API) through the real gateway,
driven by the official openai and anthropic SDKs against a mock that speaks each API: the same budgets, ledger,
stream endings and secrecy as chat, each in its own API's shapes."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import logging
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

import anthropic
import openai
import orjson
import pytest

from gateway import cli
from gateway.config.model import CacheConfig, CallerIdentity, ModelPrice, Route, RouteTarget, Settings, StoreConfig
from gateway.domain.api_requests import MESSAGES, RESPONSES, api_prompt_bound, parse_api_request
from gateway.domain.plan import Plan, Target
from gateway.domain.pricing import Usage, cost_nano, nano_to_usd
from gateway.domain.tokens import NON_TEXT_PART_TOKENS
from gateway.domain.worst_case import worst_case
from gateway.http.appkeys import BUDGET, CACHE
from gateway.mock_upstream import Action
from gateway.routing.rules import Traits
from gateway.upstream.api_streams import DIALECTS
from gateway.upstream.api_usage import messages_usage_block
from gateway.upstream.stream_meter import StreamOutcome
from gateway.upstream.usage import UNREADABLE
from tests.support.canary import CANARY_KEY
from tests.support.settings import ADMIN_KEY, CLIENT_KEY, PRICES, make_policy, make_settings

ALL_APIS = ("openai-chat", "openai-responses", "anthropic-messages")
CLAUDE = "claude-sonnet-4-5"
CLAUDE_PRICE = ModelPrice(Decimal("3.00"), Decimal("15.00"), Decimal("0.30"), max_output_tokens=1000,
                          cache_write=Decimal("3.75"))
PRICE = {**PRICES, CLAUDE: CLAUDE_PRICE}
SYSTEM = [{"type": "text", "text": "You are a careful assistant " * 20, "cache_control": {"type": "ephemeral"}}]
ASK = [{"role": "user", "content": "Say hello to the gateway"}]
LIMITS: dict[str, Any] = {"usd": "100", "tokens": 10_000_000, "requests": 100_000}


def api_settings(upstreams: dict[str, str], apis: dict[str, tuple[str, ...]] | None = None, **overrides: Any) -> Settings:
    """Test settings whose providers serve every API (or `apis` per provider) and that route and price Claude."""
    settings = make_settings(upstreams, **overrides)
    apis = apis or {}
    providers = {name: dataclasses.replace(provider, apis=apis.get(name, ALL_APIS))
                 for name, provider in settings.providers.items()}
    claude = Route(CLAUDE, tuple(RouteTarget(name) for name in upstreams))
    return dataclasses.replace(settings, providers=providers, pricing={**settings.pricing, CLAUDE: CLAUDE_PRICE},
                               routes=(*settings.routes, claude))


def cost(model: str, usage: Usage) -> Decimal:
    return nano_to_usd(cost_nano(PRICE[model], usage))


async def budget(http, gateway, key: str = ADMIN_KEY) -> dict[tuple[str, str], dict[str, Any]]:
    reply = await http(gateway, "GET", "/v1/budget/status", key=key)
    assert reply.status == 200, reply.body
    return {(e["policy"], e["unit"]): e for e in reply.json()["data"]}


async def usage_report(http, gateway, **query: str) -> dict[str, Any]:
    await gateway.app[BUDGET].settled()
    reply = await http(gateway, "GET", "/v1/budget/usage?" + urlencode(query), key=ADMIN_KEY)
    assert reply.status == 200, reply.body
    return reply.json()


async def ledger(gateway) -> list:
    await gateway.app[BUDGET].settled()
    return await gateway.app[BUDGET].store.ledger(0, 2**40, 100)


@pytest.fixture
async def gateway(upstream, start_gateway, tmp_path):
    settings = api_settings({"primary": upstream.url}, policies=(make_policy("global", **LIMITS),),
                            store=StoreConfig(path=str(tmp_path / "budget.db"), reserve_ahead=False))
    return await start_gateway(settings)


# -- 1. correct answers, exact tokens and cost ----------------------------------------------------------------

async def test_responses_create_plain_and_streamed_are_charged_their_exact_usage(gateway, upstream, sdk, http):
    client = sdk(gateway)
    reply = await client.responses.create(model="gpt-4.1", input="Say hello to the gateway", user="cached",
                                          max_output_tokens=50)
    assert reply.output_text == upstream.content
    plain = Usage(reply.usage.input_tokens, reply.usage.output_tokens,
                  reply.usage.input_tokens_details.cached_tokens)
    assert plain == Usage(8, 5, 4)            # 5 words + 3 per item; half of it cached (the mock's rule)

    stream = await client.responses.create(model="gpt-4.1", input=[{"role": "user", "content": "Hello there"}],
                                           instructions="Be brief", stream=True)
    events = [event async for event in stream]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    [done] = [e for e in events if e.type == "response.completed"]
    assert text == upstream.content and done.response.usage.output_tokens == 5
    streamed = Usage(done.response.usage.input_tokens, 5)

    assert streamed == Usage(7, 5)            # 2 words + 3 for its one item + 2 of instructions
    windows = await budget(http, gateway)
    assert Decimal(windows[("global", "usd")]["spent"]) == cost("gpt-4.1", plain) + cost("gpt-4.1", streamed)
    assert windows[("global", "tokens")]["spent"] == 13 + 12 and windows[("global", "usd")]["reserved"] in (0, "0")
    rows = sorted(await ledger(gateway), key=lambda row: row.time)
    assert [(r.endpoint, r.prompt_tokens, r.completion_tokens, r.cached_tokens) for r in rows] == [
        ("responses", 8, 5, 4), ("responses", 7, 5, 0)]


async def test_messages_create_plain_and_streamed_price_cache_writes_and_reads(gateway, upstream, anthropic_sdk,
                                                                             http):
    client = anthropic_sdk(gateway)
    first = await client.messages.create(model=CLAUDE, max_tokens=100, system=SYSTEM, messages=ASK)
    assert first.content[0].text == upstream.content and first.stop_reason == "end_turn"
    assert (first.usage.input_tokens, first.usage.cache_creation_input_tokens,
            first.usage.cache_read_input_tokens, first.usage.output_tokens) == (8, 100, 0, 5)

    async with client.messages.stream(model=CLAUDE, max_tokens=100, system=SYSTEM, messages=ASK) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        second = await stream.get_final_message()
    assert text == upstream.content
    assert (second.usage.input_tokens, second.usage.cache_creation_input_tokens,
            second.usage.cache_read_input_tokens, second.usage.output_tokens) == (8, 0, 100, 5)

    written, read = Usage(108, 5, 0, False, 100), Usage(108, 5, 100)
    # 8 x 3.00 + 100 x 3.75 + 5 x 15.00 per 1M, then 8 x 3.00 + 100 x 0.30 + 5 x 15.00
    assert cost(CLAUDE, written) == Decimal("0.000474") and cost(CLAUDE, read) == Decimal("0.000129")
    windows = await budget(http, gateway)
    assert Decimal(windows[("global", "usd")]["spent"]) == Decimal("0.000603")
    assert windows[("global", "tokens")]["spent"] == 2 * 113 and windows[("global", "usd")]["reserved"] in (0, "0")
    rows = sorted(await ledger(gateway), key=lambda row: row.time)
    assert [(r.endpoint, r.prompt_tokens, r.cached_tokens, r.cache_write_tokens, r.cost_nano) for r in rows] == [
        ("messages", 108, 0, 100, 474_000), ("messages", 108, 100, 0, 129_000)]
    assert upstream.billed.models[CLAUDE].cache_write_tokens == 100


def system_for_an_hour(text: str) -> list[dict[str, Any]]:
    """A system prompt of 20 times `text` (5 words: 100 in all) cached for an hour."""
    return [{"type": "text", "text": text * 20, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]


async def test_messages_one_hour_cache_writes_are_charged_at_their_own_rate_plain_and_streamed(
        gateway, upstream, anthropic_sdk, http):
    client = anthropic_sdk(gateway)
    plain = await client.messages.create(model=CLAUDE, max_tokens=100,
                                         system=system_for_an_hour("Be careful and be kind. "), messages=ASK)
    assert plain.usage.cache_creation.ephemeral_1h_input_tokens == 100
    async with client.messages.stream(model=CLAUDE, max_tokens=100, system=system_for_an_hour("Be brief and be exact. "),
                                      messages=ASK) as stream:
        await stream.get_final_message()
    # 8 x 3.00 + 100 x 6.00 (the 1-hour writes: twice the input price when the table names none) + 5 x 15.00
    rows = sorted(await ledger(gateway), key=lambda row: row.time)
    assert [(r.prompt_tokens, r.cache_write_tokens, r.cost_nano) for r in rows] == [(108, 100, 699_000)] * 2
    assert upstream.billed.models[CLAUDE].cache_write_1h_tokens == 200
    windows = await budget(http, gateway)
    assert Decimal(windows[("global", "usd")]["spent"]) == Decimal("0.001398")


@pytest.mark.parametrize("block, expected", [
    ({"input_tokens": 8, "output_tokens": 5, "cache_creation_input_tokens": 100,
      "cache_creation": {"ephemeral_5m_input_tokens": 40, "ephemeral_1h_input_tokens": 60}},
     Usage(108, 5, 0, False, 100, 60)),
    ({"input_tokens": 8, "output_tokens": 5, "cache_creation": {"ephemeral_1h_input_tokens": 60}},   # no total
     Usage(68, 5, 0, False, 60, 60)),
    ({"input_tokens": 8, "output_tokens": 5, "cache_creation_input_tokens": 10,
      "cache_creation": {"ephemeral_1h_input_tokens": 60}}, Usage(68, 5, 0, False, 60, 60)),
    ({"input_tokens": 8, "output_tokens": 5, "cache_creation": [60]}, UNREADABLE),
    ({"input_tokens": 8, "output_tokens": 5, "cache_creation": {"ephemeral_1h_input_tokens": -1}}, UNREADABLE),
], ids=["split", "breakdown_only", "breakdown_larger", "breakdown_not_an_object", "negative"])
def test_one_hour_cache_writes_are_read_exactly_or_the_usage_is_unknown(block, expected):
    assert messages_usage_block(block) == expected


def test_a_message_delta_that_repeats_the_input_side_keeps_the_one_hour_writes_message_start_told():
    start = {"type": "message_start", "message": {"usage": {
        "input_tokens": 8, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 0, "output_tokens": 1,
        "cache_creation": {"ephemeral_5m_input_tokens": 40, "ephemeral_1h_input_tokens": 60}}}}
    delta = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {    # the newer form
        "input_tokens": 8, "cache_creation_input_tokens": 100, "cache_read_input_tokens": 0, "output_tokens": 5}}
    events = [b"event: %s\ndata: %s\n\n" % (event["type"].encode(), orjson.dumps(event)) for event in (start, delta)]
    req = parse_api_request(MESSAGES, orjson.dumps({"model": CLAUDE, "max_tokens": 10, "messages": ASK}))
    worst = worst_case(req, Plan(CLAUDE, CLAUDE, (Target("p", CLAUDE, CLAUDE_PRICE),)), ())
    outcome = StreamOutcome(worst, CLAUDE_PRICE)
    DIALECTS["anthropic-messages"].admit(events, outcome, True)
    assert outcome.usage == Usage(108, 5, 0, False, 100, 60)


@pytest.mark.parametrize("ttl", ["5m", "1h"])
async def test_messages_usage_left_out_is_charged_all_it_reserved_with_its_writes(gateway, upstream, anthropic_sdk,
                                                                                  ttl):
    system = [{"type": "text", "text": "Be careful and be kind. " * 20, "cache_control": {"type": "ephemeral",
                                                                                         "ttl": ttl}}]
    upstream.script(Action(omit_usage=True))
    await anthropic_sdk(gateway).messages.create(model=CLAUDE, max_tokens=10, system=system, messages=ASK)
    body = {"model": CLAUDE, "max_tokens": 10, "system": system, "messages": ASK}
    req = parse_api_request(MESSAGES, orjson.dumps(body))
    worst = worst_case(req, Plan(CLAUDE, CLAUDE, (Target("primary", CLAUDE, CLAUDE_PRICE),)), ())
    [row] = await ledger(gateway)
    assert row.usage_estimated and row.cost_nano == worst.amount.usd_nano        # not the prompt at `input`


@pytest.mark.parametrize("ttl", ["5m", "1h"])
def test_a_messages_worst_case_prices_every_prompt_token_as_the_dearest_write_the_body_may_ask(ttl):
    system = [{"type": "text", "text": "x" * 1000, "cache_control": {"type": "ephemeral", "ttl": ttl}}]
    req = parse_api_request(MESSAGES, orjson.dumps({"model": CLAUDE, "max_tokens": 10, "system": system,
                                                    "messages": ASK}))
    worst = worst_case(req, Plan(CLAUDE, CLAUDE, (Target("p", CLAUDE, CLAUDE_PRICE),)), ())
    prompt = worst.usage.prompt_tokens
    writes = Usage(prompt, 10, 0, True, prompt, prompt if ttl == "1h" else 0)
    assert worst.amount.usd_nano == cost_nano(CLAUDE_PRICE, writes) > cost_nano(CLAUDE_PRICE, Usage(prompt, 10))


async def test_messages_stream_raw_events_with_stream_true(gateway, upstream, anthropic_sdk, http):
    stream = await anthropic_sdk(gateway).messages.create(model=CLAUDE, max_tokens=3, messages=ASK, stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    [row] = await ledger(gateway)
    assert (row.prompt_tokens, row.completion_tokens, row.usage_estimated) == (8, 3, False)
    assert row.cost_nano == 8 * 3_000 + 3 * 15_000


# -- 2. budget refusals the SDKs raise at once --------------------------------------------------------------

@pytest.fixture
async def tiny_gateway(upstream, start_gateway):
    return await start_gateway(api_settings({"primary": upstream.url},
                                            policies=(make_policy("tiny", usd="0.000001"),)))


async def test_responses_over_budget_raises_rate_limit_error_without_retrying(tiny_gateway, upstream, sdk, caplog):
    caplog.set_level(logging.INFO, "gateway.access")
    with pytest.raises(openai.RateLimitError) as refused:
        await sdk(tiny_gateway, max_retries=5).responses.create(model="gpt-4.1", input="hello")
    assert refused.value.body["code"] == "budget_exceeded" and "tiny" in refused.value.body["message"]
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert len([r for r in caplog.records if r.name == "gateway.access"]) == 1 and upstream.hits == 0


async def test_messages_over_budget_raises_rate_limit_error_in_anthropics_shape_without_retrying(
        tiny_gateway, upstream, anthropic_sdk, caplog):
    caplog.set_level(logging.INFO, "gateway.access")
    with pytest.raises(anthropic.RateLimitError) as refused:
        await anthropic_sdk(tiny_gateway, max_retries=5).messages.create(model=CLAUDE, max_tokens=10, messages=ASK)
    body = refused.value.body
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
    assert "tiny" in body["error"]["message"] and refused.value.response.headers["x-should-retry"] == "false"
    assert len([r for r in caplog.records if r.name == "gateway.access"]) == 1 and upstream.hits == 0


async def test_bad_input_comes_in_each_apis_own_shape(gateway, upstream, sdk, anthropic_sdk, http):
    missing = await http(gateway, "POST", "/v1/messages", json={"model": CLAUDE, "messages": ASK})  # (the SDK
    assert missing.status == 400 and missing.json()["type"] == "error"                           # insists too)
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in missing.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as stateful:
        await sdk(gateway).responses.create(model="gpt-4.1", input="hi", previous_response_id="resp_1")
    with pytest.raises(anthropic.NotFoundError) as unknown:
        await anthropic_sdk(gateway).messages.create(model="no-such-model", max_tokens=5, messages=ASK)
    assert stateful.value.body["param"] == "previous_response_id"
    assert unknown.value.body["error"]["type"] == "not_found_error" and upstream.hits == 0


# A file sent by id or URL, or an input item kept at the provider, adds input the gateway cannot see: refused in
# the API's own shape before anything is reserved or sent, as `previous_response_id` is; inline data is served.
CHAT_FILE = {"type": "file", "file": {"file_id": "file-abc123"}}
BY_REFERENCE = {
    "chat_file_id": ("chat", [{"role": "user", "content": [{"type": "text", "text": "sum up"}, CHAT_FILE]}]),
    "chat_audio_by_id": ("chat", [{"role": "user", "content": "hi"},
                                  {"role": "assistant", "audio": {"id": "audio_abc123"}},
                                  {"role": "user", "content": "say it again, slower"}]),
    "responses_file_id": ("responses", [{"role": "user", "content": [
        {"type": "input_text", "text": "sum up"}, {"type": "input_file", "file_id": "file-abc123"}]}]),
    "responses_file_url": ("responses", [{"role": "user", "content": [
        {"type": "input_file", "file_url": "https://example.invalid/report.pdf"}]}]),
    "responses_item_reference": ("responses", [{"type": "item_reference", "id": "msg_abc123"}]),
    "responses_item_reference_untyped": ("responses", [{"id": "msg_abc123"}]),
    "responses_item_reference_null_role": ("responses", [{"id": "msg_abc123", "role": None}]),
    "messages_document_url": ("messages", [{"role": "user", "content": [
        {"type": "document", "source": {"type": "url", "url": "https://example.invalid/report.pdf"}}]}]),
    "messages_document_file": ("messages", [{"role": "user", "content": [
        {"type": "document", "source": {"type": "file", "file_id": "file_abc123"}}]}]),
}


@pytest.mark.parametrize("api, prompt", BY_REFERENCE.values(), ids=BY_REFERENCE.keys())
async def test_input_the_gateway_cannot_see_is_refused_in_each_apis_own_shape(gateway, upstream, sdk,
                                                                              anthropic_sdk, http, api, prompt):
    error: openai.BadRequestError | anthropic.BadRequestError
    if api == "messages":
        with pytest.raises(anthropic.BadRequestError) as anthropic_error:
            await anthropic_sdk(gateway).messages.create(model=CLAUDE, max_tokens=5, messages=prompt)
        error = anthropic_error.value
        assert error.body["type"] == "error" and error.body["error"]["type"] == "invalid_request_error"
    else:
        with pytest.raises(openai.BadRequestError) as openai_error:
            if api == "chat":
                await sdk(gateway).chat.completions.create(model="gpt-4.1", messages=prompt)
            else:
                await sdk(gateway).responses.create(model="gpt-4.1", input=prompt)
        error = openai_error.value
    assert "cannot be bounded before the call" in error.message
    assert upstream.hits == 0
    windows = await budget(http, gateway)
    assert windows[("global", "usd")]["reserved"] in (0, "0") and Decimal(windows[("global", "usd")]["spent"]) == 0


def test_a_screenshot_given_back_counts_as_an_image():
    screenshot = {"type": "computer_screenshot", "image_url": "https://example.invalid/s.png"}
    body = {"model": "gpt-4.1", "input": [{"type": "computer_call_output", "call_id": "c", "output": screenshot}]}
    assert api_prompt_bound(parse_api_request(RESPONSES, orjson.dumps(body))) >= NON_TEXT_PART_TOKENS


def test_the_keys_of_an_input_item_count_as_its_values_do():
    action = {"type": "exec", "command": ["ls"], "env": {"a" * 50_000: "1"}}
    body = {"model": "gpt-4.1", "input": [{"type": "local_shell_call", "id": "lsh_1", "call_id": "c1",
                                           "status": "completed", "action": action}]}
    assert api_prompt_bound(parse_api_request(RESPONSES, orjson.dumps(body))) >= 50_000


def test_a_tool_inputs_own_type_keys_never_shrink_the_messages_prompt_bound():
    text = "a" * 50_000
    call = {"type": "tool_use", "id": "toolu_1", "name": "draw", "input": {"type": "image", "text": text}}
    body = {"model": CLAUDE, "max_tokens": 5, "messages": [{"role": "assistant", "content": [call]}]}
    assert api_prompt_bound(parse_api_request(MESSAGES, orjson.dumps(body))) >= len(text)


async def test_priority_processing_is_refused_and_the_other_service_tiers_pass(gateway, upstream, sdk):
    client = sdk(gateway)
    for create in (lambda tier: client.chat.completions.create(model="gpt-4.1", messages=ASK, service_tier=tier),
                   lambda tier: client.responses.create(model="gpt-4.1", input="hi", service_tier=tier)):
        with pytest.raises(openai.BadRequestError) as refused:    # billed above the table's standard rates
            await create("priority")
        assert refused.value.body["param"] == "service_tier" and upstream.hits == 0
        for tier in ("auto", "default", "flex"):
            await create(tier)
        assert upstream.requests[-1].json["service_tier"] == "flex"   # passed on as it came
        upstream.hits = 0


@pytest.mark.parametrize("tool, refused", [
    ({"type": "shell", "environment": {"type": "container_auto"}}, True),   # OpenAI runs it: container fees
    ({"type": "shell", "environment": {"type": "local"}}, False),
    ({"type": "shell"}, False),
    ({"type": ["function"]}, True),                                          # was a 500 (unhashable)
], ids=["hosted_shell", "local_shell", "shell_without_environment", "type_no_name"])
@pytest.mark.parametrize("where", ["tools", "additional_tools_item", "tool_search_output_item"])
async def test_a_shell_the_provider_runs_is_refused_and_one_the_client_runs_is_served(gateway, upstream, http,
                                                                                      tool, refused, where):
    body: dict[str, Any] = {"model": "gpt-4.1", "input": "hi", "tools": [tool]}
    if where != "tools":      # input items that bring tools of their own
        item = {"type": "additional_tools", "role": "developer", "tools": [tool]} if where == "additional_tools_item" \
            else {"type": "tool_search_output", "call_id": "c1", "status": "completed", "tools": [tool]}
        body = {"model": "gpt-4.1", "input": [{"role": "user", "content": "hi"}, item]}
    reply = await http(gateway, "POST", "/v1/responses", json=body)
    assert (reply.status, upstream.hits) == ((400, 0) if refused else (200, 1)), reply.body
    if refused:
        assert reply.json()["error"]["param"] == ("tools" if where == "tools" else "input")


def test_auto_rules_read_the_prompt_bound_the_reservation_uses_on_every_api():
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 300_000}}
    by_id = {"type": "image", "source": {"type": "file", "file_id": "file_011abc"}}
    for content in ([image], [by_id]):
        body = {"model": CLAUDE, "max_tokens": 5, "messages": [{"role": "user", "content": content}]}
        req = parse_api_request(MESSAGES, orjson.dumps(body))
        assert Traits(req, CallerIdentity("k"), {}).prompt_tokens == api_prompt_bound(req) < 3_000


async def test_a_file_sent_inline_is_served_and_bounded_by_its_data(gateway, upstream, sdk):
    inline = {"type": "file", "file": {"filename": "report.pdf", "file_data": "data:application/pdf;base64,QUJD"}}
    answer = await sdk(gateway).chat.completions.create(
        model="gpt-4.1", messages=[{"role": "user", "content": [{"type": "text", "text": "sum up"}, inline]}])
    assert answer.choices[0].message.content and upstream.hits == 1


# -- 3. a truncated stream: the SDK raises, the partial usage is charged, nothing stays reserved -------------

async def test_a_truncated_responses_stream_raises_and_charges_what_was_relayed(gateway, upstream, sdk, http):
    upstream.script(Action(truncate_after=2))
    stream = await sdk(gateway).responses.create(model="gpt-4.1", input="hello there", stream=True)
    deltas = []
    with pytest.raises(openai.APIError) as raised:
        async for event in stream:
            deltas += [event.delta] if event.type == "response.output_text.delta" else []
    assert raised.value.body["code"] == "stream_truncated" and len(deltas) == 2
    [row] = await ledger(gateway)
    assert row.usage_estimated and row.completion_tokens == 2 and row.cost_nano > 0
    windows = await budget(http, gateway)
    assert windows[("global", "usd")]["reserved"] in (0, "0")
    assert Decimal(windows[("global", "usd")]["spent"]) == nano_to_usd(row.cost_nano)


async def test_a_truncated_messages_stream_raises_and_charges_its_reported_input(gateway, upstream, anthropic_sdk,
                                                                                http):
    upstream.script(Action(truncate_after=2))
    stream = await anthropic_sdk(gateway).messages.create(model=CLAUDE, max_tokens=100, messages=ASK,
                                                         system=SYSTEM, stream=True)
    kinds = []
    with pytest.raises(anthropic.APIStatusError) as raised:
        async for event in stream:
            kinds.append(event.type)
    assert raised.value.body["error"]["type"] == "api_error" and "truncated" in raised.value.body["error"]["message"]
    assert kinds.count("content_block_delta") == 2
    [row] = await ledger(gateway)   # message_start's input (8 + 100 written) and the two deltas relayed
    assert (row.prompt_tokens, row.completion_tokens, row.cache_write_tokens, row.usage_estimated) == (108, 2, 100,
                                                                                                        True)
    assert row.cost_nano == 8 * 3_000 + 100 * 3_750 + 2 * 15_000
    windows = await budget(http, gateway)
    assert windows[("global", "usd")]["reserved"] in (0, "0") and windows[("global", "tokens")]["spent"] == 110


async def test_a_runaway_messages_stream_is_stopped_at_its_max_tokens(gateway, upstream, anthropic_sdk):
    upstream.script(Action(endless=True))
    stream = await anthropic_sdk(gateway).messages.create(model=CLAUDE, max_tokens=3, messages=ASK, stream=True)
    with pytest.raises(anthropic.APIStatusError) as raised:
        async for _event in stream:
            pass
    assert raised.value.body["error"]["type"] == "rate_limit_error"
    [row] = await ledger(gateway)
    assert row.completion_tokens <= 3 + 1 and row.prompt_tokens == 8


# -- 4. one budget over chat, responses and messages; the ledger's endpoint ---------------------------------

async def test_one_keys_chat_responses_and_messages_add_up_in_one_budget(gateway, upstream, sdk, anthropic_sdk,
                                                                        http, capsys):
    client = sdk(gateway)
    chat = await client.chat.completions.create(model="gpt-4.1", messages=ASK)
    resp = await client.responses.create(model="gpt-4.1", input="Say hello to the gateway")
    msg = await anthropic_sdk(gateway).messages.create(model=CLAUDE, max_tokens=50, messages=ASK)

    costs = {"chat": cost("gpt-4.1", Usage(chat.usage.prompt_tokens, chat.usage.completion_tokens)),
             "responses": cost("gpt-4.1", Usage(resp.usage.input_tokens, resp.usage.output_tokens)),
             "messages": cost(CLAUDE, Usage(msg.usage.input_tokens, msg.usage.output_tokens))}
    assert Decimal((await budget(http, gateway, key=CLIENT_KEY))[("global", "usd")]["spent"]) == sum(costs.values())
    report = await usage_report(http, gateway, group_by="endpoint")
    assert {row["group"]: Decimal(row["cost_usd"]) for row in report["data"]} == costs
    assert Decimal(report["total"]["cost_usd"]) == sum(costs.values())

    capsys.readouterr()
    args = ["usage", "--url", gateway.url, "--key", ADMIN_KEY, "--group-by", "endpoint", "--csv"]
    assert await asyncio.to_thread(cli.main, args) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {row["endpoint"]: Decimal(row["cost_usd"]) for row in rows} == costs


# -- 5. the provider key never leaves; each API's auth style upstream ---------------------------------------

@pytest.mark.parametrize("path, body", [
    ("/v1/responses", {"model": "gpt-4.1", "input": "hi"}),
    ("/v1/messages", {"model": CLAUDE, "max_tokens": 5, "messages": ASK}),
])
@pytest.mark.parametrize("stream", [False, True])
async def test_an_upstream_echoing_the_request_leaks_no_provider_key(gateway, upstream, http, caplog, path, body,
                                                                     stream):
    caplog.set_level(logging.DEBUG)
    upstream.script(Action(status=401, echo_request=True))
    reply = await http(gateway, "POST", path, json={**body, "stream": stream})   # the fixture asserts no canary
    assert reply.status == 401 and b"[redacted]" in reply.body
    assert all(CANARY_KEY not in record.getMessage() for record in caplog.records)


async def test_each_api_authenticates_upstream_in_its_own_style_and_never_forwards_the_clients_key(
        gateway, upstream, sdk, anthropic_sdk):
    await sdk(gateway).responses.create(model="gpt-4.1", input="hi")
    await anthropic_sdk(gateway).messages.create(model=CLAUDE, max_tokens=5, messages=ASK)
    responses, messages = upstream.requests
    assert responses.path == "/v1/responses" and responses.headers["authorization"] == f"Bearer {CANARY_KEY}"
    assert "x-api-key" not in responses.headers
    assert messages.path == "/v1/messages" and messages.headers["x-api-key"] == CANARY_KEY
    assert messages.headers["anthropic-version"] == "2023-06-01" and "authorization" not in messages.headers
    assert all(CLIENT_KEY not in orjson.dumps(r.headers).decode() for r in upstream.requests)


async def test_the_anthropic_sdk_may_send_its_key_as_a_bearer_token(gateway, anthropic_sdk, http):
    client = anthropic.AsyncAnthropic(base_url=gateway.url, auth_token=CLIENT_KEY, api_key=None, max_retries=0)
    try:
        await client.messages.create(model=CLAUDE, max_tokens=5, messages=ASK)
    finally:
        await client.close()
    [row] = await ledger(gateway)
    assert row.caller == "web-app"
    with pytest.raises(anthropic.AuthenticationError):
        await anthropic_sdk(gateway, key="sk-unknown").messages.create(model=CLAUDE, max_tokens=5, messages=ASK)


# -- routing by API, and nothing else under /v1 ------------------------------------------------------------

async def test_an_endpoint_is_routed_only_to_providers_that_serve_its_api(upstream, backup_upstream, start_gateway,
                                                                         sdk, anthropic_sdk, http):
    settings = api_settings({"primary": upstream.url, "backup": backup_upstream.url},
                            apis={"primary": ("openai-chat",)})
    gateway = await start_gateway(settings)
    await sdk(gateway).chat.completions.create(model="gpt-4.1", messages=ASK)
    await sdk(gateway).responses.create(model="gpt-4.1", input="hi")
    raw = await anthropic_sdk(gateway).messages.with_raw_response.create(model=CLAUDE, max_tokens=5, messages=ASK)
    assert raw.headers["x-gateway-provider"] == "backup"
    assert [r.path for r in upstream.requests] == ["/v1/chat/completions"]
    assert [r.path for r in backup_upstream.requests] == ["/v1/responses", "/v1/messages"]

    alone = await start_gateway(api_settings({"primary": upstream.url}, apis={"primary": ("openai-chat",)}))
    with pytest.raises(anthropic.NotFoundError) as refused:
        await anthropic_sdk(alone).messages.create(model=CLAUDE, max_tokens=5, messages=ASK)
    assert "/messages" in refused.value.body["error"]["message"] and len(upstream.requests) == 1


@pytest.mark.parametrize("method, path", [("GET", "/v1/responses/resp_1"), ("POST", "/v1/messages/count_tokens"),
                                          ("POST", "/v1/responses/resp_1/cancel"), ("POST", "/v1/batches")])
async def test_every_other_v1_path_stays_404(gateway, upstream, http, method, path):
    reply = await http(gateway, method, path, json={"model": "gpt-4.1"})
    assert reply.status == 404 and upstream.hits == 0


async def test_a_provider_serving_only_messages_authenticates_the_anthropic_way(upstream, start_gateway,
                                                                               anthropic_sdk, sdk):
    gateway = await start_gateway(api_settings({"primary": upstream.url}, apis={"primary": ("anthropic-messages",)}))
    await anthropic_sdk(gateway).messages.create(model=CLAUDE, max_tokens=5, messages=ASK)
    with pytest.raises(openai.NotFoundError):          # no provider of the route serves chat
        await sdk(gateway).chat.completions.create(model=CLAUDE, messages=ASK)
    [call] = upstream.requests
    assert call.headers["x-api-key"] == CANARY_KEY and "authorization" not in call.headers


@pytest.mark.parametrize("path, body, event", [
    ("/v1/responses", {"model": "gpt-4.1", "input": "hi", "stream": True},
     'event: response.output_text.delta\ndata: {"type":"response.output_text.delta","delta":"%s"}\n\n'
     'event: response.completed\ndata: {"type":"response.completed","response":{"usage":'
     '{"input_tokens":4,"output_tokens":1}}}\n\n'),
    ("/v1/messages", {"model": CLAUDE, "max_tokens": 5, "messages": ASK, "stream": True},
     'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"type":"text_delta","text":"%s"}}\n\n'
     'event: message_stop\ndata: {"type":"message_stop"}\n\n'),
])
async def test_a_stream_that_echoes_the_provider_key_is_scrubbed(gateway, upstream, http, path, body, event):
    upstream.script(Action(raw_body=event % ("key: " + CANARY_KEY), headers={"Content-Type": "text/event-stream"}))
    reply = await http(gateway, "POST", path, json=body)     # the fixture asserts the canary is absent
    assert reply.status == 200 and b"[redacted]" in reply.body


# -- the parts, without a server ------------------------------------------------------------------------------

@pytest.mark.parametrize("price", [CLAUDE_PRICE, dataclasses.replace(CLAUDE_PRICE, cache_write=Decimal("3.7501"))])
def test_cache_writes_cost_their_own_price_exactly(price):
    usage = Usage(1_000, 10, 200, False, 300)       # 500 plain input, 200 read, 300 written
    expected = (500 * price.input + 200 * price.cached_input + 300 * price.cache_write + 10 * price.output) / 10**6
    assert nano_to_usd(cost_nano(price, usage)) == expected.quantize(Decimal("1e-9"), rounding="ROUND_CEILING")


@pytest.mark.parametrize("block, expected", [
    ({"input_tokens": 5, "output_tokens": 2, "cache_read_input_tokens": 3, "cache_creation_input_tokens": None},
     Usage(8, 2, 3)),
    ({"input_tokens": 5, "output_tokens": 2}, Usage(5, 2)),
    ({"input_tokens": "5", "output_tokens": 2}, "unreadable"),
    ({"input_tokens": 0, "output_tokens": 0}, "unreadable"),          # zero tokens: a relay that does not count
    ({"output_tokens": 2}, "unreadable"),
])
def test_messages_usage_is_read_exactly_or_unknown_never_zero(block, expected):
    assert messages_usage_block(block) == (UNREADABLE if expected == "unreadable" else expected)


async def test_whole_responses_and_messages_answers_are_cached_and_their_streams_are_not(
        upstream, start_gateway, sdk, anthropic_sdk, http, tmp_path):
    settings = api_settings({"primary": upstream.url}, policies=(make_policy("global", **LIMITS),),
                            store=StoreConfig(path=str(tmp_path / "budget.db"), reserve_ahead=False),
                            cache=CacheConfig(models=("gpt-4.1", CLAUDE)))
    gateway = await start_gateway(settings)
    openai_client, claude = sdk(gateway), anthropic_sdk(gateway)
    responses = [await openai_client.responses.with_raw_response.create(
        model="gpt-4.1", input="Say hello to the gateway", max_output_tokens=50) for _ in range(2)]
    await gateway.app[CACHE].written()
    messages = [await claude.messages.with_raw_response.create(model=CLAUDE, max_tokens=100, messages=ASK)
                for _ in range(2)]
    for _ in range(2):
        stream = await openai_client.responses.create(model="gpt-4.1", input="Stream it", stream=True)
        assert [e async for e in stream if e.type == "response.completed"]
        await gateway.app[CACHE].written()

    assert [r.headers["x-gateway-cache"] for r in (*responses, *messages)] == ["miss", "hit"] * 2
    answers = [r.parse() for r in responses]             # the openai SDK's raw response parses at once
    assert answers[1].output_text == answers[0].output_text == upstream.content
    texts = [(await r.parse()).content[0].text for r in messages]
    assert texts[1] == texts[0] and texts[0]
    assert [r.path for r in upstream.requests] == ["/v1/responses", "/v1/messages", "/v1/responses", "/v1/responses"]
    rows = await ledger(gateway)
    hits = sorted((r.endpoint, r.status, r.cost_nano) for r in rows if r.status == "cache_hit")
    assert hits == [("messages", "cache_hit", 0), ("responses", "cache_hit", 0)]
    assert all(r.saved_nano > 0 for r in rows if r.status == "cache_hit")
    assert (await budget(http, gateway))[("global", "requests")]["spent"] == 4     # the misses and the streams
