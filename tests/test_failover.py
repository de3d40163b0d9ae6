"""Retries, circuit breakers and failover through the real app and mock upstreams; time is injected.

The gateway gets a FakeClock (breaker timings, deadlines, Retry-After dates) and a recording sleep that
moves that clock instead of waiting, so no test sleeps to pass time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime, timezone
from email.utils import formatdate
from typing import Any

import pytest

from gateway.clock import FakeClock
from gateway.config.model import BreakerConfig, ProviderConfig, RetryConfig
from gateway.http.appkeys import RESILIENCE
from gateway.mock_upstream import Action, MockUpstream
from gateway.resilience.breaker import BreakerState, CircuitBreaker
from gateway.resilience.registry import ResilienceRegistry
from tests.support.canary import CANARY_KEY
from tests.support.gateway import Reply, RunningGateway
from tests.support.settings import ADMIN_KEY, OTHER_KEY, make_settings
from tests.support.sleep import RecordingSleep

MESSAGES = [{"role": "user", "content": "Say hello to the gateway"}]
CHAT = {"model": "gpt-4.1", "messages": MESSAGES}
RETRY = RetryConfig(max_retries=2, backoff_base_s=0.01, backoff_cap_s=0.05, budget_floor=10)
QUIET_BREAKER = BreakerConfig(min_calls=10_000, consecutive_failures=10_000)



@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def sleep(clock: FakeClock) -> RecordingSleep:
    return RecordingSleep(clock)


@pytest.fixture
def start(start_gateway, clock, sleep) -> Callable[..., Awaitable[RunningGateway]]:
    """Start the gateway on the given upstreams with the test retry and breaker configs, clock and sleep."""
    async def go(*mocks: MockUpstream, **overrides: Any) -> RunningGateway:
        settings = make_settings({mock.name: mock.url for mock in mocks},
                                 **{"retry": RETRY, "breaker": QUIET_BREAKER, **overrides})
        return await start_gateway(settings, clock=clock, sleep=sleep)
    return go


@pytest.fixture
def chat(http) -> Callable[..., Awaitable[Reply]]:
    async def post(gateway: RunningGateway, **extra: Any) -> Reply:
        return await http(gateway, "POST", "/v1/chat/completions", json={**CHAT, **extra})
    return post


async def provider_status(http, gateway: RunningGateway) -> dict[str, dict[str, Any]]:
    """The admin status endpoint, by provider name."""
    reply = await http(gateway, "GET", "/v1/providers/status", key=ADMIN_KEY)
    assert reply.status == 200
    return {entry["provider"]: entry for entry in reply.json()["data"]}


async def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Let the event loop run until `predicate` holds (socket events need real loop turns)."""
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.005)


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat()


def probe_slot_free(breaker: CircuitBreaker) -> bool:
    """Whether the breaker would let a call through now (the permit taken to ask is handed back)."""
    permit = breaker.acquire()
    if permit is None:
        return False
    permit.ignore()
    return True


# -- retries within one provider ------------------------------------------------------------------------

async def test_429_retry_after_seconds_is_waited_then_retried(start, chat, upstream, sleep):
    gateway = await start(upstream)
    upstream.script(Action(status=429, headers={"Retry-After": "2"}))

    reply = await chat(gateway)

    assert reply.status == 200 and upstream.hits == 2
    assert len(sleep.waits) == 1 and sleep.waits[0] >= 2
    assert reply.headers["x-gateway-attempts"] == "2"


async def test_retry_after_as_an_http_date(start, chat, upstream, sleep, clock):
    gateway = await start(upstream)
    upstream.script(Action(status=429, headers={"Retry-After": formatdate(clock.now() + 3, usegmt=True)}))

    reply = await chat(gateway)

    assert reply.status == 200 and upstream.hits == 2
    assert sleep.waits == [pytest.approx(3.0)]


async def test_503_503_200_is_three_attempts_and_one_response(start, chat, upstream, backup_upstream):
    gateway = await start(upstream, backup_upstream)
    upstream.script(Action(status=503), Action(status=503))

    reply = await chat(gateway)

    assert reply.status == 200 and reply.json()["choices"][0]["message"]["content"] == upstream.content
    assert upstream.hits == 3 and backup_upstream.hits == 0
    assert reply.headers["x-gateway-attempts"] == "3" and reply.headers["x-gateway-provider"] == "primary"


async def test_a_client_error_is_passed_on_without_retry_or_failover(start, chat, upstream, backup_upstream):
    gateway = await start(upstream, backup_upstream)
    upstream.script(Action(status=400))

    reply = await chat(gateway)

    assert reply.status == 400 and upstream.hits == 1 and backup_upstream.hits == 0
    assert reply.headers["x-gateway-provider"] == "primary"


async def test_long_retry_after_is_not_waited_and_is_capped_for_the_client(start, chat, upstream, sleep):
    gateway = await start(upstream)
    upstream.always(Action(status=429, headers={"Retry-After": "3600"}))

    reply = await chat(gateway)

    assert reply.status == 429 and upstream.hits == 1 and sleep.waits == []
    assert reply.headers["Retry-After"] == str(int(RETRY.retry_after_cap_s))


async def test_deadline_bounds_retries_across_providers(start, chat, upstream, backup_upstream, sleep):
    gateway = await start(upstream, backup_upstream, retry=RetryConfig(max_retries=5, deadline_s=5.0))
    for mock in (upstream, backup_upstream):
        mock.always(Action(status=503, headers={"Retry-After": "2"}))

    reply = await chat(gateway)

    # primary at t=0, 2, 4; a third wait would pass t=5; the backup gets one try in the last second
    assert (upstream.hits, backup_upstream.hits) == (3, 1)
    assert reply.status == 503 and reply.headers["x-gateway-attempts"] == "4"
    assert sum(sleep.waits) < 5


# -- the circuit breaker ------------------------------------------------------------------------------

async def test_open_breaker_sends_requests_straight_to_the_backup(
        start, chat, http, upstream, backup_upstream, clock):
    gateway = await start(upstream, backup_upstream,
                          breaker=BreakerConfig(consecutive_failures=3, min_calls=10_000, open_s=10))
    upstream.always(Action(status=503))

    first = await chat(gateway)
    assert first.status == 200 and first.headers["x-gateway-provider"] == "backup"
    assert first.headers["x-gateway-attempts"] == "4" and upstream.hits == 3
    primary = (await provider_status(http, gateway))["primary"]
    assert primary["state"] == "open" and primary["open_until"] == iso(clock.now() + 10)

    for _ in range(3):
        reply = await chat(gateway)
        assert reply.headers["x-gateway-provider"] == "backup" and reply.headers["x-gateway-attempts"] == "1"
    assert upstream.hits == 3                # not one call to an open provider


async def test_half_open_lets_exactly_k_probes_through(start, chat, http, upstream, backup_upstream, clock):
    gateway = await start(upstream, backup_upstream, retry=RetryConfig(max_retries=0),
                          breaker=BreakerConfig(consecutive_failures=1, min_calls=10_000, open_s=10,
                                                half_open_probes=2))
    upstream.always(Action(status=503))
    await chat(gateway)
    clock.advance(10)
    upstream.always(Action(hang=True))

    clients = [asyncio.create_task(chat(gateway)) for _ in range(5)]
    await wait_until(lambda: upstream.hits == 1 + 2 and sum(c.done() for c in clients) == 3)

    assert all(c.result().headers["x-gateway-provider"] == "backup" for c in clients if c.done())
    assert upstream.hits == 1 + 2
    assert (await provider_status(http, gateway))["primary"]["state"] == "half_open"
    for client in clients:
        client.cancel()
    await asyncio.gather(*clients, return_exceptions=True)


async def test_failed_probe_reopens_for_twice_as_long(start, chat, http, upstream, backup_upstream, clock):
    gateway = await start(upstream, backup_upstream, retry=RetryConfig(max_retries=0),
                          breaker=BreakerConfig(consecutive_failures=1, min_calls=10_000, open_s=10))
    upstream.always(Action(status=503))
    await chat(gateway)
    clock.advance(10)

    reply = await chat(gateway)

    assert reply.headers["x-gateway-provider"] == "backup" and reply.headers["x-gateway-attempts"] == "2"
    primary = (await provider_status(http, gateway))["primary"]
    assert primary["state"] == "open" and primary["consecutive_opens"] == 2
    assert primary["open_until"] == "2026-01-01T00:00:30+00:00"     # reopened at t=10 for 20 s


async def test_healed_primary_closes_the_breaker(start, chat, http, upstream, backup_upstream, clock):
    gateway = await start(upstream, backup_upstream, retry=RetryConfig(max_retries=0),
                          breaker=BreakerConfig(consecutive_failures=1, min_calls=10_000, open_s=10))
    upstream.always(Action(status=503))
    await chat(gateway)
    clock.advance(10.5)
    assert (await provider_status(http, gateway))["primary"]["state"] == "half_open"
    upstream.always(None)

    probe = await chat(gateway)

    assert probe.status == 200 and probe.headers["x-gateway-provider"] == "primary"
    primary = (await provider_status(http, gateway))["primary"]
    assert (primary["state"], primary["open_until"], primary["consecutive_opens"]) == ("closed", None, 0)
    assert (await chat(gateway)).headers["x-gateway-provider"] == "primary"


async def test_cancelled_probe_does_not_leave_the_breaker_stuck(
        start, chat, http, upstream, backup_upstream, clock):
    gateway = await start(upstream, backup_upstream, retry=RetryConfig(max_retries=0),
                          breaker=BreakerConfig(consecutive_failures=1, min_calls=10_000, open_s=10))
    upstream.always(Action(status=503))
    await chat(gateway)
    clock.advance(10)
    upstream.always(Action(hang=True))
    probe = asyncio.create_task(chat(gateway))
    await wait_until(lambda: upstream.hits == 2)
    assert (await chat(gateway)).headers["x-gateway-provider"] == "backup"   # the one probe slot is taken

    probe.cancel()                           # the client goes away while the primary hangs
    with contextlib.suppress(asyncio.CancelledError):
        await probe
    breaker = gateway.app[RESILIENCE].breaker("primary")
    await wait_until(lambda: probe_slot_free(breaker))
    upstream.always(None)

    reply = await chat(gateway)
    assert reply.status == 200 and reply.headers["x-gateway-provider"] == "primary"
    assert (await provider_status(http, gateway))["primary"]["state"] == "closed"


async def test_all_breakers_open_answers_503_until_the_first_half_opens(
        start, chat, upstream, backup_upstream, clock):
    gateway = await start(upstream, backup_upstream, retry=RetryConfig(max_retries=0),
                          breaker=BreakerConfig(consecutive_failures=1, min_calls=10_000, open_s=10))
    for mock in (upstream, backup_upstream):
        mock.always(Action(status=503))
    assert (await chat(gateway)).status == 503
    clock.advance(4)

    reply = await chat(gateway)

    assert reply.status == 503 and reply.json()["error"]["code"] == "providers_unavailable"
    assert reply.headers["Retry-After"] == "6" and reply.headers["x-gateway-attempts"] == "0"
    assert (upstream.hits, backup_upstream.hits) == (1, 1)


# -- many clients, the SDK, and the last error ---------------------------------------------------------

async def test_retry_budget_bounds_attempts_of_200_clients_against_a_429_upstream(start, chat, upstream):
    config = RetryConfig(max_retries=2, backoff_base_s=0.01, backoff_cap_s=0.05, budget_ratio=0.2,
                         budget_floor=3)
    gateway = await start(upstream, retry=config)
    upstream.always(Action(status=429, headers={"Retry-After": "1"}))

    replies = await asyncio.gather(*(chat(gateway) for _ in range(200)))

    assert all(r.status == 429 and r.headers["Retry-After"] == "1" for r in replies)
    assert all(r.json()["error"]["type"] == "rate_limit_error" for r in replies)   # the upstream's own body
    assert 200 < upstream.hits and upstream.hits / 200 <= 1.2 + config.budget_floor / 200 + 0.01


async def test_sdk_gets_its_answer_from_the_backup(start, sdk, upstream, backup_upstream):
    gateway = await start(upstream, backup_upstream)
    upstream.always(Action(status=503))

    raw = await sdk(gateway).chat.completions.with_raw_response.create(model="gpt-4.1", messages=MESSAGES)

    assert raw.headers["x-gateway-provider"] == "backup"
    assert raw.headers["x-gateway-attempts"] == str(RETRY.max_retries + 2)
    assert raw.parse().choices[0].message.content == backup_upstream.content


@pytest.mark.parametrize(("last", "status", "code"), [
    (Action(status=500), 502, "upstream_error"),
    (Action(status=503), 503, "upstream_error"),
    (Action(status=504), 504, "upstream_error"),
    (Action(reset=True), 502, "upstream_unreachable"),
])
async def test_all_providers_failing_answers_after_the_last_error(
        start, chat, upstream, backup_upstream, last, status, code):
    gateway = await start(upstream, backup_upstream)
    upstream.always(Action(status=429, headers={"Retry-After": "1"}))
    backup_upstream.always(last)

    reply = await chat(gateway)

    assert reply.status == status and reply.json()["error"]["code"] == code
    assert reply.headers["x-gateway-attempts"] == str(2 * (RETRY.max_retries + 1))
    assert (upstream.hits, backup_upstream.hits) == (3, 3)


async def test_upstream_timeout_answers_504(start, chat, upstream):
    gateway = await start(upstream, retry=RetryConfig(max_retries=0), read_timeout_s=0.05)
    upstream.always(Action(hang=True))

    reply = await chat(gateway)

    assert reply.status == 504 and reply.json()["error"]["code"] == "upstream_timeout"


async def test_last_429_is_passed_on_with_its_body_redacted(start, chat, upstream, backup_upstream):
    gateway = await start(upstream, backup_upstream)
    upstream.always(Action(status=503))
    backup_upstream.always(Action(status=429, echo_request=True, headers={"Retry-After": "7"}))

    reply = await chat(gateway)                  # the fixture fails the test if the key shows

    assert reply.status == 429 and reply.headers["Retry-After"] == "7"
    error = reply.json()["error"]
    assert error["code"] == "echo" and error["request"]["headers"]["Authorization"] == "Bearer [redacted]"


async def test_hooks_report_retries_failovers_and_transitions(start, chat, upstream, backup_upstream):
    gateway = await start(upstream, backup_upstream,
                          breaker=BreakerConfig(consecutive_failures=3, min_calls=10_000))
    registry = gateway.app[RESILIENCE]
    seen: list[tuple[Any, ...]] = []
    registry.on_retry.append(lambda provider, reason: seen.append(("retry", provider, reason)))
    registry.on_failover.append(lambda source, target: seen.append(("failover", source, target)))
    registry.on_transition.append(lambda event: seen.append(("transition", event.provider, event.new)))
    upstream.always(Action(status=503))

    await chat(gateway)

    assert seen == [("retry", "primary", "503"), ("retry", "primary", "503"),
                    ("transition", "primary", BreakerState.OPEN), ("failover", "primary", "backup")]


async def test_a_failover_is_counted_only_when_the_next_provider_is_called(start, chat, http, upstream,
                                                                           backup_upstream, clock):
    gateway = await start(upstream, backup_upstream, retry=RetryConfig(max_retries=0),
                          breaker=BreakerConfig(consecutive_failures=3, min_calls=10_000, open_s=15))
    registry = gateway.app[RESILIENCE]
    moved: list[tuple[str, str]] = []
    registry.on_failover.append(lambda source, target: moved.append((source, target)))
    for _ in range(3):                       # backup's breaker opens: the next calls to it are refused
        registry.breaker("backup").acquire().failure()
    upstream.always(Action(status=500))

    replies = [await chat(gateway) for _ in range(2)]  # primary fails; backup's breaker refuses: nothing moves
    assert [reply.status for reply in replies] == [502, 502] and backup_upstream.hits == 0
    assert moved == []

    clock.advance(16)                        # backup half-opens: its probe is the request's real failover
    assert (await chat(gateway)).status == 200 and backup_upstream.hits == 1
    assert moved == [("primary", "backup")]
    text = (await http(gateway, "GET", "/metrics", key=None)).body.decode()
    assert 'gateway_failovers_total{from_provider="primary",to_provider="backup"} 1.0' in text


async def test_a_failover_from_a_skipped_first_provider_names_it(start, chat, upstream, backup_upstream):
    gateway = await start(upstream, backup_upstream, breaker=BreakerConfig(consecutive_failures=3, min_calls=10_000))
    registry = gateway.app[RESILIENCE]
    moved: list[tuple[str, str]] = []
    registry.on_failover.append(lambda source, target: moved.append((source, target)))
    for _ in range(3):
        registry.breaker("primary").acquire().failure()

    assert (await chat(gateway)).status == 200 and (upstream.hits, backup_upstream.hits) == (0, 1)
    assert moved == [("primary", "backup")]


# -- the status endpoint and the registry -------------------------------------------------------------

async def test_provider_status_is_for_admins_only(start, http, upstream, caplog):
    caplog.set_level(logging.INFO, "gateway.access")
    gateway = await start(upstream)
    unknown = await http(gateway, "GET", "/v1/no-such-endpoint", key=OTHER_KEY)

    for key in (OTHER_KEY, None, "sk-wrong"):
        reply = await http(gateway, "GET", "/v1/providers/status", key=key)
        assert (reply.status, reply.json()) == (404, unknown.json())

    reply = await http(gateway, "GET", "/v1/providers/status", key=ADMIN_KEY)
    assert reply.json() == {"object": "list", "data": [{
        "provider": "primary", "state": "closed", "failure_rate": 0.0, "calls_in_window": 0,
        "open_until": None, "consecutive_opens": 0}]}
    assert upstream.url not in reply.body.decode() and CANARY_KEY not in reply.body.decode()


def test_registry_sync_keeps_the_breakers_of_unchanged_providers(clock):
    settings = make_settings({"primary": "http://127.0.0.1:1/v1", "backup": "http://127.0.0.1:2/v1"})
    registry = ResilienceRegistry(settings, clock)
    primary, backup = registry.breaker("primary"), registry.breaker("backup")
    budget = registry.budget("primary")

    moved = dict(settings.providers, backup=ProviderConfig(name="backup", base_url="http://127.0.0.1:3/v1"))
    registry.sync(make_settings({"primary": "http://127.0.0.1:1/v1"}, providers=moved))

    assert registry.breaker("primary") is primary and registry.budget("primary") is budget
    assert registry.breaker("backup") is not backup
    registry.sync(make_settings({"primary": "http://127.0.0.1:1/v1"}, breaker=BreakerConfig(open_s=1)))
    assert registry.breaker("primary") is not primary
    assert [entry["provider"] for entry in registry.snapshot()] == ["primary"]
