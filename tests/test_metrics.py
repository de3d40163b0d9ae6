"""Prometheus metrics through the real app: values after mixed traffic, bounded labels, scrape-time budgets."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry

from gateway.app import create_app
from gateway.budget.instrumented import TIMED_OPERATIONS, InstrumentedStore
from gateway.budget.sqlite_store import SqliteBudgetStore
from gateway.budget.store import PLAIN, CounterKey, CounterState
from gateway.cache.service import BYPASS, ERROR, HIT, MISS
from gateway.clock import FakeClock
from gateway.config.holder import ConfigHolder
from gateway.config.loader import load_settings
from gateway.config.model import ModelPrice, Route, RouteTarget, Settings, StoreConfig
from gateway.errors import ConfigError, StoreError
from gateway.http.appkeys import BUDGET, METRICS, RELOADER
from gateway.http.auth import key_digest
from gateway.observability.access_log import AccessLog, AccessRecord
from gateway.observability.cache import CACHE_OPERATIONS
from gateway.observability.instruments import GatewayMetrics
from gateway.observability.scrape import BACKGROUND_TASKS
from tests.support.canary import CANARY_KEY
from tests.support.metrics import (
    ClockSleep, RecordingLog, metrics_settings, mixed_traffic, run_promtool, samples, scrape, total, value,
)
from tests.support.settings import ADMIN_KEY, CLIENT_KEY, OTHER_KEY, make_settings

METRICS_KEY = "sk-metrics-scraper-0004"
BREAKER_OPENS_AT = 6   # consecutive failures, as metrics_settings configures the breaker
MESSAGES_FOR_COUNT = [{"role": "user", "content": "count me once"}]
FLOOD_REQUESTS = 10_000
FLOOD_BATCH = 250


@pytest.fixture
async def traffic(upstream, backup_upstream, start_gateway, http):
    """A gateway after mixed traffic: (gateway, statuses by kind, access records, /metrics text)."""
    clock = FakeClock()
    log = RecordingLog()
    gateway = await start_gateway(metrics_settings(upstream, backup_upstream), clock=clock,
                                  sleep=ClockSleep(clock), access_log=log)
    statuses = await mixed_traffic(gateway, http, upstream, backup_upstream)
    return gateway, statuses, log.records, await scrape(gateway, http)


async def test_promtool_accepts_the_exposition(traffic) -> None:
    *_, text = traffic
    result = run_promtool("check", "metrics", stdin=text)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_request_counts_by_route_model_provider_and_status_class(traffic) -> None:
    _, statuses, _, text = traffic
    served = sum(status == 200 for kind in statuses.values() for status in kind)
    assert served == 8
    assert total(text, "gateway_requests_total", status_class="2xx") - total(
        text, "gateway_requests_total", status_class="2xx", route="none") == served
    expected = {
        ("gpt-4o-mini", "gpt-4o-mini", "primary", "2xx"): 5,
        ("gpt-4.1", "gpt-4.1", "backup", "2xx"): 2,
        ("text-embedding-3-small", "text-embedding-3-small", "primary", "2xx"): 1,
        ("text-embedding-3-small", "text-embedding-3-small", "none", "4xx"): 1,   # budget refusal
        ("gpt-4o-mini", "gpt-4o-mini", "none", "4xx"): 1,                         # upstream 429
        ("gpt-4o-mini", "gpt-4o-mini", "none", "5xx"): 1,                         # upstream 500s -> 502
    }
    for (route, model, provider, status_class), count in expected.items():
        assert value(text, "gateway_requests_total", route=route, model=model, provider=provider,
                     status_class=status_class) == count
    assert statuses["rate_limited"] == [429] and statuses["server_error"] == [502]


async def test_durations_first_token_and_in_flight(traffic) -> None:
    *_, text = traffic
    proxied = total(text, "gateway_requests_total") - total(text, "gateway_requests_total", route="none")
    assert total(text, "gateway_request_duration_seconds_count") - total(
        text, "gateway_request_duration_seconds_count", route="none") == proxied == 11
    assert value(text, "gateway_upstream_duration_seconds_count", provider="primary") == 18
    assert value(text, "gateway_upstream_duration_seconds_count", provider="backup") == 2
    assert value(text, "gateway_time_to_first_token_seconds_count", route="gpt-4o-mini", provider="primary") == 1
    assert value(text, "gateway_requests_in_flight") == 1   # the scrape itself


async def test_tokens_and_cost_equal_the_access_log(traffic) -> None:
    _, _, records, text = traffic
    charged = [r for r in records if r.cost_nano is not None]
    assert len(charged) == 8
    for kind in ("prompt", "completion", "cached"):
        logged = sum(getattr(r.usage, f"{kind}_tokens") for r in charged)
        assert total(text, "gateway_tokens_total", type=kind) == logged
    assert total(text, "gateway_cost_usd_total") == pytest.approx(sum(r.cost_nano for r in charged) / 1e9)
    for policy in ("everyone", "web-team", "embed-cap"):
        logged = sum(r.cost_nano for r in charged if policy in r.policies) / 1e9
        assert total(text, "gateway_policy_cost_usd_total", policy=policy) == pytest.approx(logged)
    assert total(text, "gateway_policy_cost_usd_total", policy="embed-cap") > 0


async def test_budget_gauges_equal_the_status_endpoint(traffic, http) -> None:
    gateway, *_ = traffic
    text = await scrape(gateway, http)
    entries = (await http(gateway, "GET", "/v1/budget/status", key=ADMIN_KEY)).json()["data"]
    assert {(e["policy"], e["period"], e["unit"]) for e in entries} == {
        ("everyone", "daily", "usd"), ("web-team", "monthly", "usd"), ("embed-cap", "daily", "requests")}
    for entry in entries:
        labels = {"policy": entry["policy"], "period": entry["period"], "unit": entry["unit"]}
        assert value(text, "gateway_budget_spent", **labels) == float(entry["spent"])
        assert value(text, "gateway_budget_limit", **labels) == float(entry["limit"])
        assert value(text, "gateway_budget_utilization", **labels) == entry["utilization"]
    assert value(text, "gateway_budget_utilization", policy="embed-cap", period="daily", unit="requests") == 1.0
    assert value(text, "gateway_budget_refusals_total", policy="embed-cap", period="daily") == 1


async def test_scrapes_health_checks_and_status_reads_are_not_counted_as_requests(
        upstream, backup_upstream, start_gateway, http) -> None:
    gateway = await start_gateway(metrics_settings(upstream, backup_upstream))
    for _ in range(3):
        chat = {"model": "gpt-4.1", "messages": MESSAGES_FOR_COUNT, "max_tokens": 5}
        assert (await http(gateway, "POST", "/v1/chat/completions", json=chat)).status == 200
    for _ in range(4):
        await scrape(gateway, http)
    for path, key in (("/healthz", None), ("/readyz", None), ("/v1/providers/status", ADMIN_KEY),
                      ("/v1/budget/status", ADMIN_KEY), ("/v1/budget/usage", ADMIN_KEY)):
        assert (await http(gateway, "GET", path, key=key)).status == 200

    text = await scrape(gateway, http)
    assert total(text, "gateway_requests_total") == 3
    assert total(text, "gateway_request_duration_seconds_count") == 3
    assert value(text, "gateway_control_requests_total", path="/metrics", status_class="2xx") == 4
    for path in ("/healthz", "/readyz", "/v1/providers/status", "/v1/budget/status", "/v1/budget/usage"):
        assert value(text, "gateway_control_requests_total", path=path, status_class="2xx") == 1


async def test_retries_failovers_and_breakers(traffic) -> None:
    *_, text = traffic
    assert value(text, "gateway_retries_total", provider="primary", reason="429") == 2
    assert value(text, "gateway_retries_total", provider="primary", reason="500") == 6
    assert value(text, "gateway_failovers_total", from_provider="primary", to_provider="backup") == 2
    assert value(text, "gateway_breaker_transitions_total", provider="primary", from_state="closed",
                 to_state="open") == 1
    assert value(text, "gateway_breaker_state", provider="primary") == 2
    assert value(text, "gateway_breaker_state", provider="backup") == 0


async def test_store_operations_are_timed(traffic) -> None:
    *_, text = traffic
    assert value(text, "gateway_store_operation_duration_seconds_count", operation="reserve") == 11
    assert value(text, "gateway_store_operation_duration_seconds_count", operation="settle") == 8
    assert value(text, "gateway_store_operation_duration_seconds_count", operation="release") == 2
    assert value(text, "gateway_store_operation_duration_seconds_count", operation="read") >= 1
    for operation in TIMED_OPERATIONS:
        assert value(text, "gateway_store_errors_total", operation=operation) == 0
    assert total(text, "gateway_config_reloads_total") == 0


class FailingReads(SqliteBudgetStore):
    """A SQLite store whose reads fail, as a store outage would."""

    async def read(self, counters: Sequence[CounterKey], now: float) -> list[CounterState]:
        raise StoreError("store down")


async def test_a_failed_store_read_leaves_budget_gauges_absent_and_counts_an_error(
        upstream, backup_upstream, start_gateway, http, tmp_path) -> None:
    store = FailingReads(str(tmp_path / "failing.db"))
    gateway = await start_gateway(metrics_settings(upstream, backup_upstream), store=store)
    assert (await http(gateway, "POST", "/v1/chat/completions",
                       json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})).status == 200
    text = await scrape(gateway, http)
    assert not [name for name, _, _ in samples(text) if name.startswith("gateway_budget_")]
    assert value(text, "gateway_store_errors_total", operation="read") == 1
    assert value(text, "gateway_breaker_state", provider="primary") == 0


async def test_metrics_key_guards_the_endpoint(upstream, backup_upstream, start_gateway, http) -> None:
    settings = metrics_settings(upstream, backup_upstream)
    server = dataclasses.replace(settings.server, metrics_key_sha256=key_digest(METRICS_KEY))
    gateway = await start_gateway(dataclasses.replace(settings, server=server))
    for key in (None, CLIENT_KEY, ADMIN_KEY):
        reply = await http(gateway, "GET", "/metrics", key=key)
        assert reply.status == 401
        assert reply.json()["error"]["code"] == "invalid_api_key"
    assert "gateway_requests_total" in await scrape(gateway, http, key=METRICS_KEY)


CONFIG_YAML = """\
server: {server}
providers:
  primary: {{base_url: "http://127.0.0.1:9/v1"}}
routes: {{gpt-4.1: [primary]}}
pricing: {{gpt-4.1: {{input: 2.00, output: 8.00}}}}
"""


def test_metrics_key_from_env_is_kept_only_as_its_digest(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG_YAML.format(server='{metrics_key: "${METRICS_KEY}"}'))
    settings = load_settings(str(path), env={"METRICS_KEY": METRICS_KEY})
    assert settings.server.metrics_key_sha256 == key_digest(METRICS_KEY)
    assert METRICS_KEY not in repr(settings)


def test_metrics_key_and_its_digest_together_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG_YAML.format(
        server=f'{{metrics_key: "${{METRICS_KEY}}", metrics_key_sha256: {key_digest(METRICS_KEY)}}}'))
    with pytest.raises(ConfigError) as raised:
        load_settings(str(path), env={"METRICS_KEY": METRICS_KEY})
    assert [str(issue) for issue in raised.value.issues] == [
        f"{path}: server.metrics_key: set metrics_key or metrics_key_sha256, not both"]


RELOAD_YAML = """\
server: {{host: 127.0.0.1}}
store: {{path: {tmp}/budget.db, journal_path: {tmp}/journal.jsonl}}
providers:
  primary: {{base_url: "{upstream}", api_key: "{key}"}}
routes: {{gpt-4.1: [primary]}}
pricing: {{gpt-4.1: {{input: {price}, output: 8.00}}}}
"""


async def test_config_reloads_are_counted_by_result(tmp_path, upstream, start_gateway, http) -> None:
    path = tmp_path / "config.yaml"

    def write(price: str) -> None:
        path.write_text(RELOAD_YAML.format(tmp=tmp_path, upstream=upstream.url, key=CANARY_KEY, price=price))

    write("2.00")
    gateway = await start_gateway(load_settings(str(path)), config_path=str(path))
    reloader = gateway.app[RELOADER]
    write("minus two")
    assert await reloader.check() is False
    write("3.00")
    assert await reloader.check() is True
    text = await scrape(gateway, http)
    assert value(text, "gateway_config_reloads_total", result="failure") == 1
    assert value(text, "gateway_config_reloads_total", result="success") == 1


def test_labels_follow_the_active_config() -> None:
    settings = make_settings({"primary": "http://127.0.0.1:9/v1"})
    holder = ConfigHolder(settings)
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry, holder)
    record = AccessRecord("r1", "POST", "/v1/chat/completions", model="gpt-5", route="gpt-5",
                          provider="primary", status=200)
    metrics.request_served(record)
    holder.swap(dataclasses.replace(
        settings, routes=(*settings.routes, Route("gpt-5", (RouteTarget("primary"),))),
        pricing={**settings.pricing, "gpt-5": ModelPrice(Decimal(1), Decimal(2))}))
    metrics.request_served(record)
    for model in ("other", "gpt-5"):
        labels = {"route": model, "model": model, "provider": "primary", "status_class": "2xx"}
        assert registry.get_sample_value("gateway_requests_total", labels) == 1


def test_two_apps_in_one_process_have_their_own_registries(tmp_path: Path) -> None:
    store = StoreConfig(path=str(tmp_path / "budget.db"), journal_path=str(tmp_path / "journal.jsonl"))
    settings = make_settings({"primary": "http://127.0.0.1:9/v1"}, store=store)
    first, second = create_app(settings), create_app(settings)
    assert first[METRICS].registry is not second[METRICS].registry
    assert REGISTRY not in (first[METRICS].registry, second[METRICS].registry)


class OddStore:
    """A store with a failing read, a settle taking an extra argument, and an operation outside the protocol;
    like every store it declares its capabilities (none beyond the operations)."""

    capabilities = PLAIN

    async def read(self, counters: Sequence[CounterKey], now: float) -> list[CounterState]:
        raise StoreError("down")

    async def settle(self, request_id: str, actual: Sequence[object], now: float, entry: object = None) -> str:
        return f"settled {request_id} with {entry}"

    async def sweep(self) -> str:
        return "swept"


async def test_instrumented_store_times_protocol_operations_and_passes_others_through() -> None:
    seen: list[tuple[str, bool]] = []
    store = InstrumentedStore(OddStore(),  # type: ignore[arg-type]
                              lambda operation, seconds, failed: seen.append((operation, failed)))
    with pytest.raises(StoreError):
        await store.read([], 0.0)
    assert await store.settle("r1", [], 0.0, entry="row") == "settled r1 with row"
    assert await store.sweep() == "swept"
    assert seen == [("read", True), ("settle", False)]


def allowed_label_values(settings: Settings) -> dict[str, set[str]]:
    """Every value each label may take under `settings` (plus `none` and `other`)."""
    routes = {route.pattern for route in settings.routes}
    providers = set(settings.providers) | {"none", "other"}
    states = {"closed", "open", "half_open"}
    return {
        "route": routes | {"none", "other"},
        "model": set(settings.pricing) | routes | {"none", "other"},
        "provider": providers, "from_provider": providers, "to_provider": providers,
        "policy": {policy.name for policy in settings.policies} | {"other"},
        "period": {"daily", "monthly", "none"},
        "unit": {"usd", "tokens", "requests"},
        "status_class": {f"{n}xx" for n in range(1, 6)},
        "type": {"prompt", "completion", "cached"},
        "reason": {str(status) for status in settings.retry.statuses} | {"timeout", "connect_error"},
        "operation": set(TIMED_OPERATIONS) | set(CACHE_OPERATIONS),
        "from_state": states, "to_state": states,
        "result": {"success", "failure", HIT, MISS, BYPASS, ERROR},
        "task": set(BACKGROUND_TASKS),
    }


def series_bound(text: str, allowed: dict[str, set[str]]) -> int:
    """Most series the exposition's sample names can have: product of allowed label values, times buckets."""
    buckets: dict[str, set[str]] = {}
    label_names: dict[str, set[str]] = {}
    for name, labels, _ in samples(text):
        label_names.setdefault(name, set()).update(labels.keys() - {"le"})
        if "le" in labels:
            buckets.setdefault(name, set()).add(labels["le"])
    return sum(math.prod(len(allowed[label]) for label in names) * max(1, len(buckets.get(name, ())))
               for name, names in label_names.items())


async def flood_one(gateway, http, rng: random.Random) -> int:
    """One request with a random path, model, key and headers; one in ten is served (glob route)."""
    token = f"rnd-{rng.getrandbits(48):x}"
    headers = {f"X-{token}": token, "User-Agent": token, "X-Request-Id": token}
    chat = {"messages": [{"role": "user", "content": token}], "max_tokens": 3}
    kind = rng.choices(("path", "served", "unknown_model", "unknown_key"), weights=(3, 1, 3, 3))[0]
    if kind == "path":
        return (await http(gateway, rng.choice(["GET", "POST"]), f"/{token}/{token}", headers=headers)).status
    if kind == "unknown_key":
        return (await http(gateway, "POST", "/v1/chat/completions", key=f"sk-{token}", headers=headers,
                           json={**chat, "model": "gpt-4.1"})).status
    model = f"gpt-{token}" if kind == "served" else token      # the gpt-* glob route serves gpt-<anything>
    return (await http(gateway, "POST", "/v1/chat/completions", key=rng.choice([CLIENT_KEY, OTHER_KEY]),
                       headers=headers, json={**chat, "model": model})).status


async def test_random_models_paths_and_keys_leave_series_bounded_by_the_config(
        upstream, backup_upstream, start_gateway, http) -> None:
    settings = metrics_settings(upstream, backup_upstream)
    gateway = await start_gateway(settings, access_log=AccessLog(enabled=False))   # 10k log lines add nothing
    rng = random.Random(5)
    statuses: list[int] = []
    for _ in range(FLOOD_REQUESTS // FLOOD_BATCH):
        statuses += await asyncio.gather(*(flood_one(gateway, http, rng) for _ in range(FLOOD_BATCH)))
    assert {200, 401, 404} <= set(statuses)
    text = await scrape(gateway, http)
    allowed = allowed_label_values(settings)
    series = {(name, tuple(sorted(labels.items()))) for name, labels, _ in samples(text)}
    for name, labels in series:
        for label, label_value in labels:
            assert label == "le" or label_value in allowed[label], (name, label, label_value)
    assert len(series) <= series_bound(text, allowed)
    assert total(text, "gateway_requests_total") >= FLOOD_REQUESTS
    # the glob route renames every model to gpt-4o-mini: the served model is the label
    assert value(text, "gateway_requests_total", route="gpt-*", model="gpt-4o-mini", provider="primary",
                 status_class="2xx") == statuses.count(200)
    for secret in ("rnd-", CLIENT_KEY, OTHER_KEY, key_digest(CLIENT_KEY), key_digest(OTHER_KEY), "web-app",
                   "batch", "sk-"):
        assert secret not in text


# -- several worker processes answer as one (gateway.peers) ----------------------------------------------

async def test_sibling_workers_scrape_as_one_and_show_every_workers_breakers(
        upstream, backup_upstream, start_gateway, http, tmp_path: Path) -> None:
    from gateway.http.appkeys import RESILIENCE
    from gateway.peers import Peers
    from gateway.status_cli import render_providers

    settings = metrics_settings(upstream, backup_upstream)
    workers = [await start_gateway(settings, peers=Peers(str(tmp_path), index, 2)) for index in (0, 1)]
    chat = {"model": "gpt-4.1", "messages": MESSAGES_FOR_COUNT, "max_tokens": 5}
    for index in (0, 0, 0, 1, 1):
        assert (await http(workers[index], "POST", "/v1/chat/completions", json=chat)).status == 200
    for worker in workers:       # settled in the background: else a scrape and the status may read apart
        await worker.app[BUDGET].settled()
    breaker = workers[1].app[RESILIENCE].breaker("primary")
    for _ in range(BREAKER_OPENS_AT):         # only worker 1's breaker of primary opens
        breaker.acquire().failure()

    for worker in workers:
        text = await scrape(worker, http)
        assert total(text, "gateway_requests_total") == 5
        assert total(text, "gateway_request_duration_seconds_count") == 5
        assert value(text, "gateway_breaker_state", provider="primary") == 2   # the worst worker's
        assert value(text, "gateway_budget_spent", policy="everyone", period="daily", unit="usd") == \
            float((await http(worker, "GET", "/v1/budget/status", key=ADMIN_KEY)).json()["data"][0]["spent"])
        status = (await http(worker, "GET", "/v1/providers/status", key=ADMIN_KEY)).json()["data"]
        primary = next(entry for entry in status if entry["provider"] == "primary")
        assert primary["state"] == "open"
        assert [(w["worker"], w["state"]) for w in primary["workers"]] == [(0, "closed"), (1, "open")]
        assert "open (1 of 2 workers)" in render_providers(status)    # what `gateway status` prints


async def test_a_sibling_that_does_not_answer_fails_the_scrape_rather_than_shrink_it(
        upstream, backup_upstream, start_gateway, http, tmp_path: Path) -> None:
    from gateway.peers import Peers

    alone = await start_gateway(metrics_settings(upstream, backup_upstream), peers=Peers(str(tmp_path), 0, 2))
    reply = await http(alone, "GET", "/metrics", key=None)
    assert reply.status == 503 and reply.json()["error"]["code"] == "worker_unavailable"
    assert (await http(alone, "GET", "/v1/providers/status", key=ADMIN_KEY)).status == 503


def test_merged_counters_add_up_created_is_the_earliest_and_breaker_state_is_the_worst() -> None:
    from prometheus_client import Counter, Gauge

    from gateway.observability.merge import decode, encode, merge

    def worker(requests: int, breaker: int, created: float) -> list:
        registry = CollectorRegistry()
        counter = Counter("gateway_demo_requests", "Requests.", ("route",), registry=registry)
        counter.labels("chat").inc(requests)
        Gauge("gateway_breaker_state", "Breaker.", ("provider",), registry=registry).labels("p").set(breaker)
        Gauge("gateway_requests_in_flight", "In flight.", registry=registry).set(1)
        families = decode(encode(registry.collect()))     # as a sibling sends them
        for family in families:
            family.samples[:] = [s._replace(value=created) if s.name.endswith("_created") else s
                                 for s in family.samples]
        return families

    merged = {(s.name, tuple(s.labels.values())): s.value
              for family in merge([worker(3, 0, 200.0), worker(4, 2, 100.0)]) for s in family.samples}
    assert merged[("gateway_demo_requests_total", ("chat",))] == 7
    assert merged[("gateway_demo_requests_created", ("chat",))] == 100.0
    assert merged[("gateway_breaker_state", ("p",))] == 2
    assert merged[("gateway_requests_in_flight", ())] == 2
