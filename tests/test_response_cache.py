"""The response cache through the real gateway: identical requests answered once, scoped to the tenant,
never charged twice (issue 19)."""

from __future__ import annotations

import asyncio
import dataclasses
from decimal import Decimal
from typing import Any

import orjson
import pytest

from gateway import cli
from gateway.http import cached
from gateway.http.appkeys import BUDGET, CACHE, CONFIG
from gateway.clock import FakeClock
from gateway.config.model import CacheConfig, RateLimit, Route, RouteTarget, StoreConfig
from gateway.mock_upstream import Action
from gateway.domain.pricing import Usage, cost_nano, nano_to_usd
from tests.support.canary import CANARY_KEY
from tests.support.metrics import run_promtool
from tests.support.metrics import value as sample
from tests.support.settings import ADMIN_KEY, CLIENT_KEY, OTHER_KEY, PRICES, make_policy, make_settings

CACHED = CacheConfig(models=("gpt-4o-mini", "text-embedding-*"))
LIMITS: dict[str, Any] = {"usd": "100", "tokens": 10_000_000, "requests": 100_000}
POLICIES = (make_policy("everyone", **LIMITS),)
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "What is a cache?"}], "max_tokens": 50}


def settings_for(upstream, store_config, cache: CacheConfig = CACHED, **overrides: Any):
    return make_settings({"primary": upstream.url}, store=store_config, cache=cache, **{"policies": POLICIES, **overrides})


async def post(http, gateway, body: dict[str, Any], key: str = CLIENT_KEY, **headers: str):
    return await http(gateway, "POST", "/v1/chat/completions", json=body, key=key, headers=headers)


async def settled(gateway) -> None:
    """Cache writes and budget settlements (both in the background) have landed."""
    await gateway.app[CACHE].written()
    await gateway.app[BUDGET].settled()


async def ledger(gateway) -> list:
    await settled(gateway)
    return await gateway.app[BUDGET].store.ledger(0, 2**40, 10_000)


async def status(http, gateway) -> dict[tuple[str, str], Any]:
    reply = await http(gateway, "GET", "/v1/budget/status", key=ADMIN_KEY)
    return {(e["period"], e["unit"]): e["spent"] for e in reply.json()["data"]}


# --- 1. 100 requests over 10 prompts: 10 upstream calls, 10 charged, 90 hits with their savings ---------------

async def test_a_hundred_sdk_requests_over_ten_prompts_make_ten_upstream_calls_and_ninety_free_hits(
        upstream, start_gateway, sdk, http, store_config):
    gateway = await start_gateway(settings_for(upstream, store_config))
    client = sdk(gateway)
    answers: dict[int, list[str | None]] = {}
    for i in range(100):
        chat = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"question number {i % 10}"}], max_tokens=50)
        answers.setdefault(i % 10, []).append(chat.choices[0].message.content)
        await gateway.app[CACHE].written()        # the next identical request finds the answer stored
    vectors = {}
    for i in range(100):
        embedding = await client.embeddings.create(model="text-embedding-3-small", input=f"text {i % 10} " * (i % 10 + 1))
        vectors.setdefault(i % 10, []).append(embedding.data[0].embedding)
        await gateway.app[CACHE].written()

    assert [request.path for request in upstream.requests].count("/v1/chat/completions") == 10
    assert [request.path for request in upstream.requests].count("/v1/embeddings") == 10
    assert all(len(set(texts)) == 1 and texts[0] for texts in answers.values())
    assert all(all(vector == vectors_[0] for vector in vectors_) for vectors_ in vectors.values())
    rows = await ledger(gateway)
    served = {row.request_id: row for row in rows if row.status == "served"}
    hits = [row for row in rows if row.status == "cache_hit"]
    assert len(served) == 20 and len(hits) == 180
    billed = sum(cost_nano(PRICES[model], Usage(b.prompt_tokens, b.completion_tokens, b.cached_tokens))
                 for model, b in upstream.billed.models.items())
    spent = await status(http, gateway)
    assert spent[("daily", "requests")] == 20                        # the budget was charged for 20 requests
    assert Decimal(spent[("daily", "usd")]) == nano_to_usd(billed) == nano_to_usd(sum(r.cost_nano for r in served.values()))
    assert all(hit.cost_nano == 0 and hit.saved_nano > 0 and hit.policies == ("everyone",) for hit in hits)
    assert sum(hit.saved_nano for hit in hits) == 9 * billed          # each answer was bought once, saved 9 times
    report = (await http(gateway, "GET", "/v1/budget/usage", key=ADMIN_KEY)).json()["total"]
    assert (report["requests"], report["cache_hits"]) == (20, 180)
    assert Decimal(report["saved_usd"]) == nano_to_usd(9 * billed)


async def test_gateway_usage_shows_hits_and_savings_per_team(upstream, start_gateway, http, capsys, tmp_path):
    gateway = await start_gateway(settings_for(upstream, StoreConfig(path=str(tmp_path / "b.db"))))
    for _ in range(4):
        assert (await post(http, gateway, CHAT)).status == 200
        await settled(gateway)
    [served] = [row for row in await ledger(gateway) if row.status == "served"]
    capsys.readouterr()
    args = ["usage", "--url", gateway.url, "--key", ADMIN_KEY, "--group-by", "team"]
    assert await asyncio.to_thread(cli.main, args) == 0
    table = capsys.readouterr().out.splitlines()
    assert "CACHE HITS" in table[1] and "SAVED USD" in table[1]
    web = next(line.split() for line in table if line.startswith("web"))
    assert web[1] == "1" and web[-2:] == ["3", str(nano_to_usd(3 * served.cost_nano))]


async def test_a_hit_says_so_with_its_age_and_a_miss_says_miss(upstream, start_gateway, http, tmp_path):
    clock = FakeClock()
    gateway = await start_gateway(settings_for(upstream, StoreConfig(path=str(tmp_path / "b.db"))), clock=clock)
    miss = await post(http, gateway, CHAT)
    await settled(gateway)
    clock.advance(42)
    hit = await post(http, gateway, CHAT)
    assert (miss.headers["x-gateway-cache"], hit.headers["x-gateway-cache"]) == ("miss", "hit")
    assert hit.headers["age"] == "42" and "age" not in miss.headers
    assert hit.json() == miss.json() and len(upstream.requests) == 1
    assert "x-gateway-provider" not in hit.headers and hit.headers["x-request-id"] != miss.headers["x-request-id"]


async def test_models_not_listed_are_never_cached_nor_marked(upstream, start_gateway, http, store_config):
    gateway = await start_gateway(settings_for(upstream, store_config))
    body = {**CHAT, "model": "gpt-4.1"}
    replies = [await post(http, gateway, body) for _ in range(2)]
    assert len(upstream.requests) == 2 and all("x-gateway-cache" not in r.headers for r in replies)


async def test_stream_user_and_stream_options_share_an_entry_but_any_other_field_does_not(
        upstream, start_gateway, http, tmp_path):
    gateway = await start_gateway(settings_for(upstream, StoreConfig(path=str(tmp_path / "b.db"))))
    await post(http, gateway, CHAT)
    await settled(gateway)
    same = [{**CHAT, "user": "someone"}, {"max_tokens": 50, **CHAT}, {**CHAT, "stream": False}]
    other = [{**CHAT, "max_tokens": 51}, {**CHAT, "temperature": 0}]
    assert [(await post(http, gateway, body)).headers["x-gateway-cache"] for body in same] == ["hit"] * 3
    assert [(await post(http, gateway, body)).headers["x-gateway-cache"] for body in other] == ["miss"] * 2


# --- 2. scope ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("scope", "other_team_hits"), [("team", False), ("global", True)])
async def test_teams_share_answers_only_when_the_scope_is_global(upstream, start_gateway, http, store_config,
                                                                 scope, other_team_hits):
    gateway = await start_gateway(settings_for(upstream, store_config, dataclasses.replace(CACHED, scope=scope)))
    first = await post(http, gateway, CHAT, key=CLIENT_KEY)              # team web
    await settled(gateway)
    again = await post(http, gateway, CHAT, key=CLIENT_KEY)
    other = await post(http, gateway, CHAT, key=OTHER_KEY)               # team data
    assert (first.headers["x-gateway-cache"], again.headers["x-gateway-cache"]) == ("miss", "hit")
    assert other.headers["x-gateway-cache"] == ("hit" if other_team_hits else "miss")
    assert len(upstream.requests) == (1 if other_team_hits else 2)


# --- 3. streams -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("first_streamed", [True, False])
async def test_a_stream_is_served_from_cache_with_the_same_content_and_usage_only_when_asked(
        upstream, start_gateway, sdk, store_config, first_streamed):
    gateway = await start_gateway(settings_for(upstream, store_config))
    client = sdk(gateway)
    messages = [{"role": "user", "content": "Tell me about caching in three words"}]
    if first_streamed:
        original = await _streamed(client, messages, include_usage=False)
    else:
        chat = await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        original = (chat.choices[0].message.content, None)
    await settled(gateway)
    with_usage = await _streamed(client, messages, include_usage=True)
    without = await _streamed(client, messages, include_usage=False)
    whole = await client.chat.completions.create(model="gpt-4o-mini", messages=messages)

    assert len(upstream.requests) == 1
    assert with_usage[0] == without[0] == whole.choices[0].message.content == original[0] == upstream.content
    billed = upstream.billed.models["gpt-4o-mini"]
    assert with_usage[1] is not None and without[1] is None
    assert (with_usage[1].prompt_tokens, with_usage[1].completion_tokens) == (billed.prompt_tokens,
                                                                               billed.completion_tokens)
    assert whole.usage is not None and whole.usage.completion_tokens == billed.completion_tokens


async def _streamed(client, messages, *, include_usage: bool) -> tuple[str, Any]:
    """The content the SDK reads from a stream, and its usage chunk's usage (None without one)."""
    options = {"stream_options": {"include_usage": True}} if include_usage else {}
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True, **options)
    content, usage, finish = "", None, None
    async for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    assert finish == "stop"
    return content, usage


async def test_a_streamed_hit_has_the_providers_event_shape(upstream, start_gateway, http, tmp_path):
    gateway = await start_gateway(settings_for(upstream, StoreConfig(path=str(tmp_path / "b.db"))))
    await post(http, gateway, CHAT)
    await settled(gateway)
    reply = await post(http, gateway, {**CHAT, "stream": True})
    assert reply.headers["x-gateway-cache"] == "hit" and reply.headers["Content-Type"] == "text/event-stream"
    events = reply.body.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [orjson.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert all(chunk["object"] == "chat.completion.chunk" and "usage" not in chunk for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(chunks) > 3 and chunks[-1]["choices"][0]["finish_reason"] == "stop"


# --- 4. errors, truncated streams and refusals are never served from cache ------------------------------

@pytest.mark.parametrize("failure", ["truncated_stream", "429", "500", "budget_refusal", "content_filter"])
# a content filter's answer is a refusal: kept, it would refuse the same prompt for the whole TTL
async def test_a_failed_answer_is_never_served_from_cache_afterwards(upstream, start_gateway, http, store_config,
                                                                    failure):
    settings = settings_for(upstream, store_config, retry=dataclasses.replace(
        make_settings({}).retry, max_retries=0))
    if failure == "budget_refusal":
        settings = dataclasses.replace(settings, policies=(make_policy("tiny", usd="0.0000001"),))
    gateway = await start_gateway(settings)
    body = {**CHAT, "stream": failure == "truncated_stream"}
    refused = {"truncated_stream": Action(truncate_after=2), "429": Action(status=429), "500": Action(status=500),
               "content_filter": Action(raw_body=orjson.dumps({
                   "id": "x", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini",
                   "choices": [{"index": 0, "finish_reason": "content_filter",
                                "message": {"role": "assistant", "content": None}}],
                   "usage": {"prompt_tokens": 5, "completion_tokens": 0}}).decode())}
    if failure in refused:
        upstream.script(refused[failure])
    first = await post(http, gateway, body)
    assert first.status != 200 or failure in ("truncated_stream", "content_filter")
    await settled(gateway)
    if failure == "budget_refusal":
        assert first.status == 429 and not upstream.requests
        return await _then_served_fresh(upstream, start_gateway, http, settings, body)
    second = await post(http, gateway, body)
    assert second.status == 200 and second.headers["x-gateway-cache"] == "miss"
    assert len(upstream.requests) == 2


async def _then_served_fresh(upstream, start_gateway, http, settings, body) -> None:
    """The same request once the budget allows it goes upstream (nothing was kept from the refusal)."""
    gateway = await start_gateway(dataclasses.replace(settings, policies=POLICIES))
    reply = await post(http, gateway, body)
    assert (reply.status, reply.headers["x-gateway-cache"], len(upstream.requests)) == (200, "miss", 1)


# --- 5. single-flight -------------------------------------------------------------------------------------

async def test_fifty_identical_concurrent_requests_on_a_cold_cache_make_one_upstream_call(
        upstream, start_gateway, http, store_config):
    gateway = await start_gateway(settings_for(upstream, store_config))
    upstream.always(Action(delay_s=0.3))      # the first call is still in flight when the others arrive
    replies = await asyncio.gather(*(post(http, gateway, CHAT) for _ in range(50)))
    assert [reply.status for reply in replies] == [200] * 50
    assert len(upstream.requests) == 1
    assert sorted(reply.headers["x-gateway-cache"] for reply in replies) == ["hit"] * 49 + ["miss"]
    assert len({reply.json()["choices"][0]["message"]["content"] for reply in replies}) == 1
    rows = await ledger(gateway)
    assert sorted(row.status for row in rows) == ["cache_hit"] * 49 + ["served"]
    assert (await status(http, gateway))[("daily", "requests")] == 1


async def test_when_the_leader_fails_the_waiting_requests_go_upstream_themselves(upstream, start_gateway, http,
                                                                                 tmp_path):
    settings = settings_for(upstream, StoreConfig(path=str(tmp_path / "b.db")),
                            retry=dataclasses.replace(make_settings({}).retry, max_retries=0))
    gateway = await start_gateway(settings)
    upstream.script(Action(status=400, delay_s=0.3))
    replies = await asyncio.gather(*(post(http, gateway, CHAT) for _ in range(5)))
    assert sorted(reply.status for reply in replies) == [200] * 4 + [400]
    assert len(upstream.requests) == 5


async def test_when_keeping_the_leaders_answer_fails_the_waiting_requests_go_upstream_themselves(
        upstream, start_gateway, http, tmp_path, monkeypatch):
    def broken(delivery: object, config: object) -> bytes:
        raise RuntimeError("a bug while the answer is put together")
    monkeypatch.setattr(cached, "_answer", broken)
    gateway = await start_gateway(settings_for(upstream, StoreConfig(path=str(tmp_path / "b.db"))))
    upstream.script(Action(delay_s=0.3))
    replies = await asyncio.wait_for(asyncio.gather(*(post(http, gateway, CHAT) for _ in range(5))), 10)
    assert [reply.status for reply in replies] == [200] * 5     # none waits for ever on the leader's flight
    assert len(upstream.requests) == 5


# --- 7. Cache-Control -------------------------------------------------------------------------------------

async def test_no_cache_skips_the_lookup_and_refreshes_the_entry(upstream, start_gateway, http, store_config):
    gateway = await start_gateway(settings_for(upstream, store_config))
    first = await post(http, gateway, CHAT)
    await settled(gateway)
    fresh = await post(http, gateway, CHAT, **{"Cache-Control": "no-cache"})
    await settled(gateway)
    after = await post(http, gateway, CHAT)
    assert fresh.headers["x-gateway-cache"] == "bypass" and len(upstream.requests) == 2
    assert after.headers["x-gateway-cache"] == "hit"
    assert after.json()["id"] == fresh.json()["id"] != first.json()["id"]     # the mock numbers its answers


async def test_no_store_neither_reads_nor_writes(upstream, start_gateway, http, store_config):
    gateway = await start_gateway(settings_for(upstream, store_config))
    first = await post(http, gateway, CHAT, **{"Cache-Control": "No-Store"})
    await settled(gateway)
    second = await post(http, gateway, CHAT)
    await settled(gateway)
    third = await post(http, gateway, CHAT, **{"Cache-Control": "max-age=0, no-store"})
    assert [r.headers["x-gateway-cache"] for r in (first, second, third)] == ["bypass", "miss", "bypass"]
    assert len(upstream.requests) == 3


# --- a cache store outage never fails a request; metrics ---------------------------------------------------

class BrokenStore:
    """A cache store that always fails."""

    bounds_time = False

    def expect_ttl(self, ttl_s: float) -> None:
        pass

    def may_hold(self, key: str, now: float) -> bool:
        return True

    async def get(self, key: str, now: float) -> bytes | None:
        raise ConnectionError("down")

    async def put(self, key: str, value: bytes, now: float, expires_at: float, max_bytes: int) -> None:
        raise ConnectionError("down")

    async def close(self) -> None:
        pass


async def test_a_cache_store_outage_is_a_counted_miss_never_a_failed_request(upstream, start_gateway, http,
                                                                              tmp_path):
    gateway = await start_gateway(settings_for(upstream, StoreConfig(path=str(tmp_path / "b.db"))),
                                  cache_store=BrokenStore())
    other = {**CHAT, "messages": [{"role": "user", "content": "Another question"}]}
    replies = [await post(http, gateway, body) for body in (CHAT, other)]
    await settled(gateway)
    assert [(r.status, r.headers["x-gateway-cache"]) for r in replies] == [(200, "miss")] * 2
    again = await post(http, gateway, CHAT)        # this replica still holds its own answer in memory
    assert (again.status, again.headers["x-gateway-cache"], len(upstream.requests)) == (200, "hit", 2)
    text = (await http(gateway, "GET", "/metrics", key=ADMIN_KEY)).body.decode()
    assert sample(text, "gateway_cache_lookups_total", result="error", model="gpt-4o-mini") == 2
    assert sample(text, "gateway_cache_store_errors_total", operation="get") == 2
    assert sample(text, "gateway_cache_store_errors_total", operation="put") == 2


async def test_metrics_count_lookups_by_result_and_model_and_usd_saved_by_policy(upstream, start_gateway, http,
                                                                                 store_config):
    gateway = await start_gateway(settings_for(upstream, store_config))
    await post(http, gateway, CHAT)
    await settled(gateway)
    for _ in range(3):
        await post(http, gateway, CHAT)
    await post(http, gateway, CHAT, **{"Cache-Control": "no-store"})
    await settled(gateway)
    text = (await http(gateway, "GET", "/metrics", key=ADMIN_KEY)).body.decode()
    served = [row for row in await ledger(gateway) if row.status == "served"][0]
    assert [sample(text, "gateway_cache_lookups_total", result=result, model="gpt-4o-mini")
            for result in ("hit", "miss", "bypass")] == [3, 1, 1]
    assert sample(text, "gateway_cache_saved_usd_total", policy="everyone") == pytest.approx(3 * served.cost_nano / 1e9)
    checked = run_promtool("check", "metrics", stdin=text)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- entries hold the answer and its usage, never a header or a key --------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
async def test_an_entry_holds_the_scrubbed_answer_never_a_header_or_key(upstream, start_gateway, http, tmp_path,
                                                                        stream):
    gateway = await start_gateway(settings_for(upstream, StoreConfig(path=str(tmp_path / "b.db"))))
    upstream.script(_echoing_its_key(stream))
    first = await post(http, gateway, {**CHAT, "stream": stream})   # `http` fails the test on a leaked key
    await settled(gateway)
    hit = await post(http, gateway, {**CHAT, "stream": stream})
    assert (first.status, hit.status, hit.headers["x-gateway-cache"]) == (200, 200, "hit")
    stored = (tmp_path / "b-cache.db").read_bytes() + (tmp_path / "b-cache.db-wal").read_bytes()
    assert b"your key is" in stored and CANARY_KEY.encode() not in stored
    assert b"x-mock-upstream" not in stored and b"Bearer" not in stored and CLIENT_KEY.encode() not in stored


def _echoing_its_key(stream: bool) -> Action:
    """An answer that repeats the provider's key (a chat answer, or its stream)."""
    base = {"id": "chatcmpl-1", "created": 1, "model": "gpt-4o-mini"}
    usage = {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15}
    text = f"your key is {CANARY_KEY} indeed"
    if not stream:
        return Action(raw_body=orjson.dumps({**base, "object": "chat.completion", "usage": usage, "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}).decode())
    chunks = [{**base, "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": delta, "finish_reason": finish}]} for delta, finish in (
            ({"role": "assistant", "content": text}, None), ({}, "stop"))]
    chunks.append({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
    events = "".join(f"data: {orjson.dumps(chunk).decode()}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
    return Action(raw_body=events, headers={"Content-Type": "text/event-stream"})


# --- a hit is a request for request-rate limits, and nothing else -------------------------------------------

async def test_a_hit_counts_as_one_request_in_request_rate_and_in_flight_limits_but_costs_no_tokens_or_budget(
        upstream, start_gateway, http, store_config):
    policy = dataclasses.replace(make_policy("everyone", **LIMITS), max_concurrent=5, rate_limits=(
        RateLimit(per="minute", requests=3), RateLimit(per="hour", tokens=10**6)))
    gateway = await start_gateway(settings_for(upstream, store_config, policies=(policy,)))
    replies = []
    for _ in range(4):
        replies.append(await post(http, gateway, CHAT))
        await settled(gateway)

    assert [r.status for r in replies] == [200, 200, 200, 429] and len(upstream.requests) == 1
    assert [r.headers.get("x-gateway-cache") for r in replies[:3]] == ["miss", "hit", "hit"]
    assert [r.headers["x-ratelimit-remaining-requests"] for r in replies[:3]] == ["2", "1", "0"]
    assert replies[3].json()["error"]["code"] == "rate_limit_exceeded" and "Retry-After" in replies[3].headers
    windows = (await http(gateway, "GET", "/v1/rate_limits/status", key=ADMIN_KEY)).json()["data"]
    used = {(e["per"], e.get("unit")): e["used"] for e in windows}
    billed = upstream.billed.models["gpt-4o-mini"]
    assert used[("minute", "requests")] == 3 and used[("concurrent", "requests")] == 0
    assert used[("hour", "tokens")] == billed.prompt_tokens + billed.completion_tokens    # the miss's only
    spent = await status(http, gateway)
    assert spent[("daily", "requests")] == 1 and Decimal(spent[("daily", "usd")]) > 0    # the miss alone
    hits = [row for row in await ledger(gateway) if row.status == "cache_hit"]
    assert len(hits) == 2 and all(h.cost_nano == 0 and h.saved_nano > 0 and h.policies == ("everyone",) for h in hits)


# --- a request served from the cache before is known again by its bytes (gateway.http.repeat_hits) ----------

async def test_repeated_identical_hits_still_tell_keys_users_and_cache_control_apart(upstream, start_gateway, http,
                                                                                    store_config):
    gateway = await start_gateway(settings_for(upstream, store_config))
    first = await post(http, gateway, CHAT)
    await settled(gateway)
    repeats = [await post(http, gateway, CHAT, **{"x-gateway-user": "ann"}) for _ in range(3)]
    bob = await post(http, gateway, CHAT, **{"x-gateway-user": "bob"})
    other_team = await post(http, gateway, CHAT, key=OTHER_KEY, **{"x-gateway-user": "ann"})
    refreshed = await post(http, gateway, CHAT, **{"x-gateway-user": "ann", "Cache-Control": "no-cache"})
    await settled(gateway)
    after = await post(http, gateway, CHAT, **{"x-gateway-user": "ann"})

    assert [r.headers["x-gateway-cache"] for r in (*repeats, bob)] == ["hit"] * 4
    assert all(r.json() == first.json() for r in (*repeats, bob))
    assert (other_team.headers["x-gateway-cache"], refreshed.headers["x-gateway-cache"]) == ("miss", "bypass")
    assert after.headers["x-gateway-cache"] == "hit" and after.json() == refreshed.json() != first.json()
    assert len(upstream.requests) == 3
    hits = [row for row in await ledger(gateway) if row.status == "cache_hit"]
    assert [(row.user, row.caller) for row in hits] == [("ann", "web-app")] * 3 + [("bob", "web-app"), ("ann", "web-app")]


async def test_repeated_hits_of_a_stream_replay_it_with_usage_only_when_asked(upstream, start_gateway, sdk,
                                                                               store_config):
    gateway = await start_gateway(settings_for(upstream, store_config))
    client = sdk(gateway)
    messages = [{"role": "user", "content": "Tell me about caching in three words"}]
    original = await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    await settled(gateway)
    for include_usage in (True, False, True, False):
        text, usage = await _streamed(client, messages, include_usage=include_usage)
        assert text == original.choices[0].message.content
        assert (usage is not None) == include_usage
    assert len(upstream.requests) == 1


async def test_repeated_hits_end_with_their_entry_and_with_the_config_that_cached_them(upstream, start_gateway, http,
                                                                                       tmp_path):
    clock = FakeClock()
    gateway = await start_gateway(settings_for(upstream, StoreConfig(path=str(tmp_path / "b.db")),
                                               dataclasses.replace(CACHED, ttl_s=60)), clock=clock)
    replies = [await post(http, gateway, CHAT) for _ in range(3)]
    await settled(gateway)
    clock.advance(61)
    expired = await post(http, gateway, CHAT)
    await settled(gateway)
    again = [await post(http, gateway, CHAT) for _ in range(2)]
    holder = gateway.app[CONFIG]
    holder.swap(dataclasses.replace(holder.current, cache=dataclasses.replace(CACHED, models=("text-embedding-*",))))
    uncached = await post(http, gateway, CHAT)

    assert [r.headers["x-gateway-cache"] for r in (*replies, expired, *again)] == ["miss", "hit", "hit", "miss",
                                                                                   "hit", "hit"]
    assert "x-gateway-cache" not in uncached.headers and len(upstream.requests) == 3


async def test_repeated_hits_through_a_split_are_still_routed_and_counted_down_its_arms(upstream, start_gateway,
                                                                                       http, store_config):
    split = Route("gpt-4o-mini", (RouteTarget("primary"), RouteTarget("backup")), (50, 50))  # type: ignore[arg-type]
    settings = make_settings({"primary": upstream.url, "backup": upstream.url}, store=store_config, cache=CACHED,
                             policies=POLICIES)
    gateway = await start_gateway(dataclasses.replace(settings, routes=(split, *settings.routes)))
    replies = [await post(http, gateway, CHAT) for _ in range(8)]
    text = (await http(gateway, "GET", "/metrics", key=ADMIN_KEY)).body.decode()
    arms = [sample(text, "gateway_route_arm_requests_total", route="gpt-4o-mini", arm=arm) or 0
            for arm in ("primary", "backup")]
    assert [r.status for r in replies] == [200] * 8 and sum(arms) == 8 and len(upstream.requests) == 1


async def _raw(http, gateway, path: str, body: bytes, content_type: str = "application/json", **headers: str):
    return await http(gateway, "POST", path, data=body, headers={"Content-Type": content_type, **headers})


async def test_the_same_bytes_on_another_endpoint_session_or_content_type_take_the_full_path(
        upstream, start_gateway, http, store_config):
    gateway = await start_gateway(settings_for(upstream, store_config))
    body = orjson.dumps(CHAT)
    replies = [await _raw(http, gateway, "/v1/chat/completions", body, **{"x-gateway-session": "s1"})
               for _ in range(3)]
    await settled(gateway)
    other_session = await _raw(http, gateway, "/v1/chat/completions", body, **{"x-gateway-session": "s2"})
    completions = await _raw(http, gateway, "/v1/completions", body, **{"x-gateway-session": "s1"})
    plain_text = await _raw(http, gateway, "/v1/chat/completions", body, "text/plain", **{"x-gateway-session": "s1"})

    assert [r.headers["x-gateway-cache"] for r in (*replies, other_session)] == ["miss", "hit", "hit", "hit"]
    assert (completions.status, completions.headers["x-gateway-cache"]) == (400, "miss")   # the mock wants a prompt
    assert plain_text.status == 415
    hits = [row for row in await ledger(gateway) if row.status == "cache_hit"]
    assert [row.session for row in hits] == ["s1", "s1", "s2"]


async def test_a_repeated_request_waits_for_a_refresh_in_flight_and_gets_its_fresh_answer(
        upstream, start_gateway, http, store_config):
    gateway = await start_gateway(settings_for(upstream, store_config))
    first = [await post(http, gateway, CHAT) for _ in range(3)]          # a miss, then hits: remembered
    await settled(gateway)
    upstream.script(Action(delay_s=0.3))
    refresh = asyncio.create_task(post(http, gateway, CHAT, **{"Cache-Control": "no-cache"}))
    for _ in range(500):                                                 # until the refresh is upstream
        if len(upstream.requests) == 2:
            break
        await asyncio.sleep(0.002)
    follower = await post(http, gateway, CHAT)
    fresh = await refresh
    assert fresh.headers["x-gateway-cache"] == "bypass" and follower.headers["x-gateway-cache"] == "hit"
    assert follower.json() == fresh.json() != first[0].json() and len(upstream.requests) == 2
