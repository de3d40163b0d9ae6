"""100,000 distinct end users through an `each: user` policy: the store holds one small counter per user active
in the current window, each expiring with its window; a settled request leaves nothing else behind.

Bound stated (and checked on a real redis-server): at most USER_BYTES_BOUND bytes of Redis memory per active user
per budget window (the counter's hash and its expiry), measured as INFO memory's used_memory before and after.
"""

from __future__ import annotations

import asyncio
import time

import redis

from gateway.budget.sqlite_store import SqliteBudgetStore
from gateway.budget.slots import USER_KEY_GRACE_S
from gateway.budget.windows import window_for
from gateway.clock import FakeClock
from gateway.config.model import StoreConfig
from gateway.domain.ledger_facts import LedgerFacts
from gateway.domain.pricing import Usage, charge_for
from gateway.domain.request import ENDPOINTS, parse_request
from gateway.http.appkeys import BUDGET, CONFIG, ROUTER
from tests.support.settings import PRICES, make_settings
from tests.test_user_budgets import USER_POLICY

USERS = 100_000
USER_BYTES_BOUND = 384   # measured ~293 (redis 7, jemalloc): key name, 6-field hash, keyspace and expiry entries
LEDGER_ROWS = 1_000          # the ledger is capped apart from the counters (ledger_max_entries)
BODY = b'{"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}'
USAGE = Usage(6, 5)


async def serve_users(app, users: range, batch: int = 250) -> None:
    """Reserve and settle one request per end user straight on the gateway's engine (no HTTP: 100,000 of them)."""
    engine, settings = app[BUDGET], app[CONFIG].current
    caller, plan = settings.keys[0].identity, app[ROUTER].plans.plan_for(settings, "gpt-4.1")
    charge = charge_for(PRICES["gpt-4.1"], USAGE)

    async def one(user: int) -> None:
        req = parse_request(ENDPOINTS["chat"], BODY, f"user-{user}")
        reservation = await engine.reserve(f"r{user}", settings, caller, plan, req)
        engine.settle(reservation, charge, LedgerFacts("gpt-4.1", "gpt-4.1", "primary", 1, USAGE, 0.0, req.user))

    for start in range(users.start, users.stop, batch):
        await asyncio.gather(*(one(user) for user in range(start, min(start + batch, users.stop))))
        await engine.settled()


async def test_100000_users_cost_a_bounded_counter_each_that_expires_with_its_window(
        upstream, start_gateway, fresh_redis_server):
    client = redis.Redis.from_url(fresh_redis_server.url)
    clock = FakeClock(time.time())          # near Redis's own clock, which expires the counters
    store = StoreConfig(url=fresh_redis_server.url, ledger_max_entries=LEDGER_ROWS, timeout_s=5)
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=store, policies=(USER_POLICY,)),
                                  clock=clock)
    await serve_users(gateway.app, range(1_000))          # the ledger reaches its cap: it grows no more
    before = client.info("memory")["used_memory"]

    await serve_users(gateway.app, range(1_000, 1_000 + USERS))

    per_user = (client.info("memory")["used_memory"] - before) / USERS
    assert per_user <= USER_BYTES_BOUND, f"{per_user:.0f} bytes per user"
    keys = [key.decode() for key in client.scan_iter(count=10_000)]
    counters = [key for key in keys if ":ctr:per-user:daily:" in key]
    assert len(counters) == 1_000 + USERS and len(keys) - len(counters) <= 2   # the ledger (and its clock)
    window = window_for("daily", "UTC", clock.now())
    limit_ms = round((window.end_ts + USER_KEY_GRACE_S) * 1000)
    with client.pipeline(transaction=False) as pipe:
        for key in counters[::97]:
            pipe.pexpiretime(key)
        expiries = pipe.execute()
    assert all(0 < expiry <= limit_ms for expiry in expiries)    # gone an hour after the window, never kept


async def test_the_embedded_store_purges_expired_user_counters(upstream, start_gateway, tmp_path):
    clock = FakeClock(time.time())
    path = tmp_path / "budget.db"
    gateway = await start_gateway(make_settings({"primary": upstream.url}, store=StoreConfig(path=str(path)),
                                                policies=(USER_POLICY,)), clock=clock)
    await serve_users(gateway.app, range(2_000))
    assert await counter_rows(path) == 2_000

    clock.set(window_for("daily", "UTC", clock.now()).end_ts + USER_KEY_GRACE_S + 1)
    await serve_users(gateway.app, range(2_000, 2_001))          # any store call drops what has expired

    assert await counter_rows(path) == 1


async def counter_rows(path) -> int:
    store = SqliteBudgetStore(str(path))
    try:
        return await store._transaction(lambda db: db.execute("SELECT COUNT(*) FROM counters").fetchone()[0])
    finally:
        await store.close()
