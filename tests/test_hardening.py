"""Fixes from the hardening review: reservations that count every token, strict request fields,
bounded usage times, reload races, header secrets and failover on every 5xx."""

from __future__ import annotations

import asyncio
import dataclasses
from decimal import Decimal
from typing import Any

import orjson
import pytest

from gateway.config.model import ModelPrice, ProviderConfig, RetryConfig
from gateway.domain.plan import Plan, Target
from gateway.domain.pricing import Usage, cost_nano
from gateway.domain.request import ENDPOINTS, parse_request
from gateway.domain.tokens import NON_TEXT_PART_TOKENS, prompt_upper_bound
from gateway.domain.worst_case import worst_case
from gateway.http.appkeys import PROVIDERS
from gateway.mock_upstream import Action
from tests.support.gateway import Reply
from tests.support.settings import ADMIN_KEY, PRICES, make_policy, make_settings

CHAT = "/v1/chat/completions"
GOOD = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}
HEADER_SECRET = "hdr-SECRET-123456789"


async def no_sleep(_seconds: float) -> None:
    """The gateway's retry sleep, without the wait."""


def assert_invalid_request(reply: Reply) -> None:
    """A 400 in OpenAI's error shape with code invalid_request."""
    assert reply.status == 400, reply.body
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["code"] == "invalid_request"


def nested(depth: int) -> Any:
    """A list `depth` levels deep around one string."""
    value: Any = "deep"
    for _ in range(depth):
        value = [value]
    return value


@pytest.fixture
async def gateway(upstream, start_gateway):
    """One provider, no policy."""
    return await start_gateway(make_settings({"primary": upstream.url}))


@pytest.fixture
async def capped_gateway(upstream, start_gateway):
    """One provider under a 1,000-token daily policy."""
    settings = make_settings({"primary": upstream.url}, policies=(make_policy("cap", tokens=1000),))
    return await start_gateway(settings)


# -- A: the worst case counts every completion and every field sent to the model --------------------------

async def test_n_choices_multiply_the_reservation_past_a_token_limit(capped_gateway, upstream, http):
    reply = await http(capped_gateway, "POST", CHAT, json={**GOOD, "max_tokens": 100, "n": 20})
    assert reply.status == 429 and reply.json()["error"]["code"] == "budget_exceeded"
    assert upstream.hits == 0


async def test_a_completions_prompt_list_multiplies_the_reservation(capped_gateway, upstream, http):
    body = {"model": "gpt-4.1", "prompt": ["hi"] * 20, "max_tokens": 100}
    reply = await http(capped_gateway, "POST", "/v1/completions", json=body)
    assert reply.status == 429 and upstream.hits == 0


async def test_an_absurd_worst_case_is_refused_not_a_500(capped_gateway, upstream, http):
    reply = await http(capped_gateway, "POST", CHAT, json={**GOOD, "max_tokens": 2**31 - 1, "n": 10**6})
    assert reply.status == 429 and upstream.hits == 0


def test_the_prompt_bound_counts_response_format_tools_and_prediction_bytes():
    schema = {"type": "object", "properties": {f"field_{i}": {"type": "string"} for i in range(300)}}
    response_format = {"type": "json_schema", "json_schema": {"name": "big", "schema": schema}}
    prediction = {"type": "content", "content": "x" * 5000}
    extra = len(orjson.dumps(response_format)) + len(orjson.dumps(prediction))
    bound = prompt_upper_bound({**GOOD, "response_format": response_format, "prediction": prediction})
    assert extra <= bound <= extra + 100               # a JSON schema's "type" keys are not media parts


def test_the_prompt_bound_counts_audio_and_file_data_bytes():
    audio = {"type": "input_audio", "input_audio": {"data": "A" * 50_000, "format": "wav"}}
    file = {"type": "file", "file": {"filename": "a.pdf", "file_data": "B" * 30_000}}
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "C" * 30_000}}
    bound = prompt_upper_bound({"model": "m", "messages": [{"role": "user", "content": [audio, file, image]}]})
    assert 80_000 + NON_TEXT_PART_TOKENS <= bound < 81_000 + NON_TEXT_PART_TOKENS


TEXT = "a" * 50_000      # 50,000 bytes: at least 50,000 prompt tokens' worth of bound


@pytest.mark.parametrize("message", [
    {"role": "user", "type": "made_up", "content": TEXT},
    {"role": "user", "content": [{"type": "made_up", "text": TEXT}]},
    {"role": "user", "content": [{"type": ["not", "a", "name"], "text": TEXT}]},
    {"role": "assistant", "content": [{"type": "refusal", "refusal": TEXT}]},
    {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": TEXT, "format": "wav"}}]},
    {"role": "user", "type": "image_url", "content": TEXT},
    {"role": "assistant", "tool_calls": [{"id": "c", "type": "image_url", "function": {"name": "f", "arguments": TEXT}}]},
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}, "text": TEXT}]},
], ids=["message_type", "part_type", "type_no_name", "refusal_part", "audio_data", "message_typed_as_image",
        "tool_call_typed_as_image", "text_beside_an_image"])
def test_a_type_on_a_message_or_part_never_shrinks_the_prompt_bound_below_its_text(message):
    assert prompt_upper_bound({"model": "m", "messages": [message]}) >= len(TEXT)


@pytest.mark.parametrize("payload", [
    {"model": "m", "prompt": TEXT, "messages": []},                                    # completions
    {"model": "m", "prompt": "x", "suffix": TEXT},
    {"model": "m", "input": [TEXT], "messages": [{"role": "user", "content": "x"}]},   # embeddings
    {"model": "m", "messages": {"role": "user", "content": TEXT}},                     # no list: no matter
], ids=["prompt_beside_empty_messages", "suffix", "input_beside_messages", "messages_not_a_list"])
def test_every_prompt_field_a_request_carries_is_counted_whichever_the_endpoint_reads(payload):
    assert prompt_upper_bound(payload) >= len(TEXT)


def test_a_part_of_a_kind_the_gateway_does_not_know_counts_at_least_the_media_allowance():
    video = {"type": "video_url", "video_url": {"url": "https://example.invalid/v.mp4"}}
    assert prompt_upper_bound({"model": "m", "messages": [{"role": "user", "content": [video]}]}) \
        >= NON_TEXT_PART_TOKENS


@pytest.fixture
async def token_capped_gateway(upstream, start_gateway):
    """One provider under a 10,000-token daily policy."""
    return await start_gateway(make_settings({"primary": upstream.url}, policies=(make_policy("cap", tokens=10_000),)))


async def test_a_made_up_type_on_a_long_message_does_not_slip_it_under_a_token_budget(token_capped_gateway,
                                                                                      upstream, http):
    # a provider that ignores the unknown field would bill all 50,000 bytes; the bound was a flat 2,000 tokens
    body = {**GOOD, "max_tokens": 10, "messages": [{"role": "user", "type": "made_up", "content": TEXT}]}
    refused = await http(token_capped_gateway, "POST", CHAT, json=body)
    assert refused.status == 429 and refused.json()["error"]["code"] == "budget_exceeded"
    assert upstream.hits == 0
    served = await http(token_capped_gateway, "POST", CHAT, json={**GOOD, "max_tokens": 10})
    assert served.status == 200 and upstream.hits == 1


async def test_a_chat_web_search_is_refused_as_the_responses_apis_hosted_tools_are(gateway, upstream, http):
    reply = await http(gateway, "POST", CHAT, json={**GOOD, "web_search_options": {}})
    assert_invalid_request(reply)
    error = reply.json()["error"]
    assert error["param"] == "web_search_options" and "cannot be bounded before the call" in error["message"]
    assert upstream.hits == 0


IMAGE = {"type": "image_url", "image_url": {"url": "https://example.invalid/photo.png", "detail": "high"}}
TWO_IMAGES = {"model": "gpt-4o-mini", "max_tokens": 10,
              "messages": [{"role": "user", "content": [{"type": "text", "text": "compare"}, IMAGE, IMAGE]}]}


@pytest.fixture
async def image_priced_gateway(upstream, start_gateway):
    """gpt-4o-mini priced with the 48,169 tokens one image may cost on it, under a 50,000-token daily policy."""
    pricing = {**PRICES, "gpt-4o-mini": dataclasses.replace(PRICES["gpt-4o-mini"], image_tokens=48_169)}
    return await start_gateway(make_settings({"primary": upstream.url}, pricing=pricing,
                                             policies=(make_policy("cap", tokens=50_000),)))


async def test_each_image_reserves_what_one_image_may_cost_on_the_model_that_serves_it(image_priced_gateway,
                                                                                      upstream, http):
    refused = await http(image_priced_gateway, "POST", CHAT, json=TWO_IMAGES)   # 2 x 48,169: past 50,000
    assert refused.status == 429 and refused.json()["error"]["code"] == "budget_exceeded"
    assert upstream.hits == 0
    one = {**TWO_IMAGES, "messages": [{"role": "user", "content": [IMAGE]}]}
    assert (await http(image_priced_gateway, "POST", CHAT, json=one)).status == 200
    default = await http(image_priced_gateway, "POST", CHAT, json={**TWO_IMAGES, "model": "gpt-4.1"})
    assert default.status == 200 and upstream.hits == 2                        # 2 x 2,000 on gpt-4.1


@pytest.mark.parametrize("part", [
    {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,QUJD"}},
    {"type": "image", "image": "https://example.invalid/y.png"},          # a kind chat does not know
], ids=["small_file", "unknown_kind"])
def test_a_part_that_may_hold_images_counts_at_least_the_models_image_allowance(part):
    payload = {"model": "m", "messages": [{"role": "user", "content": [part]}]}
    assert prompt_upper_bound(payload, 48_169) >= 48_169


def test_a_plan_reserves_each_prices_images_at_that_prices_own_allowance():
    dear, many = ModelPrice(Decimal("10"), Decimal("10")), ModelPrice(Decimal("0.15"), Decimal("0.60"),
                                                                        image_tokens=48_169)
    req = parse_request(ENDPOINTS["chat"], orjson.dumps(TWO_IMAGES))
    plan = Plan("m", "m", (Target("a", "m", dear), Target("b", "m", many)))
    worst = worst_case(req, plan, ())
    assert worst.usage.prompt_tokens >= 2 * 48_169
    expected = max(cost_nano(dear, Usage(prompt_upper_bound(TWO_IMAGES), 10)),
                   cost_nano(many, Usage(prompt_upper_bound(TWO_IMAGES, 48_169), 10)))
    assert worst.amount.usd_nano == expected          # not the dearest price times the largest allowance


# -- B: request fields of the wrong type, out of range, or nested too deeply -------------------------------

@pytest.mark.parametrize("extra", [
    {"stream": "true"},
    {"stream": 1},
    {"stream": True, "stream_options": "include_usage"},
    {"stream_options": ["include_usage"]},
    {"n": 0},
    {"n": "2"},
    {"n": True},
    {"best_of": -1},
    {"best_of": 1.5},
    {"max_tokens": 2**31},
    {"max_completion_tokens": 2**40},
], ids=str)
async def test_a_malformed_field_is_400_before_the_upstream(gateway, upstream, http, extra):
    assert_invalid_request(await http(gateway, "POST", CHAT, json={**GOOD, **extra}))
    assert upstream.hits == 0


async def test_the_largest_max_tokens_is_passed_on(gateway, upstream, http):
    reply = await http(gateway, "POST", CHAT, json={**GOOD, "max_tokens": 2**31 - 1, "n": 1, "best_of": 1})
    assert reply.status == 200 and upstream.hits == 1


async def test_a_body_too_deep_to_reencode_is_400_not_500(gateway, upstream, http):
    messages = [{"role": "user", "content": nested(300)}]
    reply = await http(gateway, "POST", CHAT, json={**GOOD, "messages": messages, "stream": True})
    assert_invalid_request(reply)
    assert upstream.hits == 0


async def test_a_body_too_deep_to_bound_is_400_not_500(capped_gateway, upstream, http):
    messages = [{"role": "user", "content": nested(900)}]   # orjson reads 1,024 levels; Python recurses less
    reply = await http(capped_gateway, "POST", CHAT, json={**GOOD, "messages": messages})
    assert_invalid_request(reply)
    assert upstream.hits == 0


# -- C: usage report times out of range ---------------------------------------------------------------------

@pytest.mark.parametrize("query", ["until=1e14", "since=-1", "until=9999-12-31T23:59:59", "since=1e14&until=2e14"])
async def test_a_usage_time_out_of_range_is_400(gateway, http, query):
    assert_invalid_request(await http(gateway, "GET", f"/v1/budget/usage?{query}", key=ADMIN_KEY))


# -- D: a reload while a request is in flight ---------------------------------------------------------------

async def test_a_provider_removed_by_a_reload_still_serves_a_request_planned_before(
        upstream, backup_upstream, start_gateway, http):
    settings = make_settings({"primary": upstream.url, "a": backup_upstream.url},
                             retry=RetryConfig(max_retries=0))
    gateway = await start_gateway(settings, sleep=no_sleep)
    upstream.script(Action(status=500, delay_s=0.3))         # the request fails over to 'a' after the reload
    request = asyncio.create_task(http(gateway, "POST", CHAT, json=GOOD))
    async with asyncio.timeout(5):
        while upstream.hits == 0:
            await asyncio.sleep(0.01)

    gateway.app[PROVIDERS].sync({"primary": settings.providers["primary"]})
    reply = await request

    assert reply.status == 200, reply.body
    assert reply.headers["x-gateway-provider"] == "a" and backup_upstream.hits == 1


# -- E: secrets in provider headers -------------------------------------------------------------------------

async def test_secret_provider_headers_are_redacted_from_an_echoed_error(upstream, start_gateway, http):
    settings = make_settings({"primary": upstream.url})
    primary = settings.providers["primary"]
    with_header = ProviderConfig(name="primary", base_url=primary.base_url, api_key=primary.api_key,
                                 headers=(("api-key", HEADER_SECRET),), timeouts=primary.timeouts)
    gateway = await start_gateway(make_settings({"primary": upstream.url}, providers={"primary": with_header}))
    upstream.script(Action(status=401, echo_request=True))

    reply = await http(gateway, "POST", CHAT, json=GOOD)

    assert reply.status == 401 and upstream.requests[-1].headers["api-key"] == HEADER_SECRET
    assert HEADER_SECRET not in reply.body.decode() and "[redacted]" in reply.body.decode()


async def test_a_cookie_set_by_the_provider_is_not_sent_on_later_calls(upstream, start_gateway, http):
    by_name = upstream.url.replace("127.0.0.1", "localhost")   # a cookie jar keeps no cookies of an IP address
    gateway = await start_gateway(make_settings({"primary": by_name}))
    upstream.script(Action(headers={"Set-Cookie": "sticky=client-a; Path=/"}))

    first = await http(gateway, "POST", CHAT, json=GOOD)
    second = await http(gateway, "POST", CHAT, json=GOOD)

    assert first.status == second.status == 200
    assert "cookie" not in upstream.requests[-1].headers     # another client's call carries no jar state


# -- F: every 5xx fails over ----------------------------------------------------------------------------------

async def test_a_520_fails_over_to_the_backup_without_a_retry(upstream, backup_upstream, start_gateway, http):
    settings = make_settings({"primary": upstream.url, "backup": backup_upstream.url})
    gateway = await start_gateway(settings, sleep=no_sleep)
    upstream.always(Action(status=520))

    reply = await http(gateway, "POST", CHAT, json=GOOD)

    assert reply.status == 200 and reply.headers["x-gateway-provider"] == "backup"
    assert upstream.hits == 1 and backup_upstream.hits == 1


async def test_a_520_from_every_provider_is_a_502(upstream, backup_upstream, start_gateway, http):
    settings = make_settings({"primary": upstream.url, "backup": backup_upstream.url})
    gateway = await start_gateway(settings, sleep=no_sleep)
    upstream.always(Action(status=520))
    backup_upstream.always(Action(status=505))

    reply = await http(gateway, "POST", CHAT, json=GOOD)

    assert reply.status == 502 and reply.json()["error"]["code"] == "upstream_error"
    assert upstream.hits == 1 and backup_upstream.hits == 1
