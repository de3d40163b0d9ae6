"""The budget store on Redis, Redis Cluster or Sentinel: one Lua script per operation, one round trip each.

Ledger reads (XRANGE) are single commands and need no script; alert claims are scripts on a pool
connection, as rare as alerts (both in `gateway.budget.redis_records`); so are canary records
(`gateway.budget.redis_canary`).

CPU matters here (two scripts per request): the scripts take few, compact arguments (numbers as one
JSON array, see lib.lua), and on Redis and Sentinel they are auto-pipelined over one dedicated
connection (`ScriptPipeline`). A cluster (or a client the pipeline does not fit) runs each call on its
own through redis-py's public API: EVALSHA, SCRIPT LOAD on NOSCRIPT (see `gateway.budget.redis_driver`).

The store decides which calls may wait to share a write: settlements and releases (nobody waits for
them: the request has its answer, or a spare goes back) and spare batches not needed now. A caller who
starts waiting for them calls `flush`.

Key layout (prefix "gw"):

    {gw}:ctr:<policy>:<period>:<window_id>   hash spent_usd, spent_tokens, spent_requests,
                                             reserved_usd, reserved_tokens, reserved_requests;
                                             PEXPIREAT the line's expires_at (window end + grace)
    {gw}:rate:<policy>:<per>:<each>:<epoch>  hash of one epoch of a sliding rate window: r, t (requests,
                                             tokens used in it), r<j>, t<j> (in its bucket j); PEXPIREAT
                                             the end of the last window that reaches it
    {gw}:conc:<policy>:<each>                hash n: requests in flight; PEXPIREAT past the newest lease
    {gw}:resv:<request_id>                   hash <counter key> -> "usd tokens requests expires_ms[ j]"
    {gw}:leases                              zset request_id scored by lease_until
    {gw}:spent:<request_id>                  marker: spend recorded (journal replay) or by an ended lease
    {gw}:ledger                              stream: one row per request (id = its time), MAXLEN ~ N
    {gw}:alert:<key>                         hash payload, lease (ms), done once delivered; PXAT the
                                             window end (a plain "1" marker of an earlier release:
                                             delivered)
    {gw}:alert_leases                        zset alert key scored by its claim's lease end (ms), until
                                             delivered
    {gw}:canary:<canary>                     hash step, status, since (ms) and the arms' tally fields
                                             of the step (see canary_record.py); PEXPIRE moved on by
                                             every sync

Every key carries the hash tag `{<prefix>}`, so on Redis Cluster all budget keys live on ONE slot:
that is the price of atomic reservations across policies (a request reserves on all its counters in
one script). Needs Redis >= 6.2 (SET ... PXAT).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import orjson
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster, Sentinel
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.backoff import NoBackoff

from gateway.budget.canary_record import ArmTally, CanaryRecord, CanaryStatus
from gateway.budget.rate_windows import BUCKETS, bucket_ms, epoch_of, kind_of, split_each
from gateway.budget.redis_canary import RedisCanaries
from gateway.budget.redis_driver import PublicApiDriver, ScriptDriver, choose_driver, store_error
from gateway.budget.redis_records import LedgerAndAlerts, ms, script_source
from gateway.budget.store import (
    RESERVED, SWEEP_MAX, UNITS, BudgetStore, CounterKey, CounterState, LedgerEntry, Limits,
    OperationObserver, PackedStates, ReserveLine, ReserveOutcome, StoreCapabilities, check_record_lines,
    check_reserve_lines, check_spare_ids, check_spend, time_ms,
)
from gateway.domain.pricing import Charge
from gateway.errors import StoreError

__all__ = ["RedisBudgetStore", "create_redis_client"]

HEALTH_CHECK_S = 30
MAX_CACHED = 4096   # counter keys and limit words kept (they change with each window)
_SCRIPTS = ("reserve", "settle", "release", "record", "file_rows", "read", "ping")
_SELF_TIMED = frozenset((*_SCRIPTS, "reserve_spares"))   # the script operations: timed by the driver

RedisClient = Redis | RedisCluster
T = TypeVar("T")


class RedisBudgetStore:
    """BudgetStore on a redis-py asyncio client (Redis, RedisCluster or a Sentinel master).

    RedisCluster's per-node pool raises instead of waiting when all its connections are busy; give
    `max_in_flight` (the pool size) to queue store calls instead.
    """

    def __init__(self, client: RedisClient, *, prefix: str = "gw", max_in_flight: int | None = None,
                 ledger_max_entries: int = 1_000_000) -> None:
        self._client = client
        self._ledger_max = ledger_max_entries
        self._prefix = f"{{{prefix}}}:"
        self._scripts = {name: client.register_script(script_source(name)) for name in _SCRIPTS}
        self._commands = PublicApiDriver(client, max_in_flight)   # ledger reads and alerts, always
        self._records = LedgerAndAlerts(client, self._commands, self._prefix)
        self._canaries = RedisCanaries(client, self._commands, self._prefix)
        self._driver: ScriptDriver = choose_driver(client, self._commands)
        self.capabilities: StoreCapabilities = replace(self._driver.capabilities, self_timed=_SELF_TIMED)
        self._leases = self._key("leases")
        self._words = _CounterWords(self._prefix)

    @property
    def client(self) -> RedisClient:
        """The redis-py client (the response cache shares it; the store closes it)."""
        return self._client

    @property
    def driver(self) -> ScriptDriver:
        """What sends the store's scripts (the response cache sends its own down the same, pipelined on Redis)."""
        return self._driver

    def flush(self) -> None:
        """Send the calls waiting to share a write now (somebody is waiting for them)."""
        self._driver.send_queued()

    def observe_calls(self, observe: OperationObserver) -> None:
        """Report the time and outcome of every script operation (`capabilities.self_timed`) to `observe`."""
        self._driver.observe = observe

    def counter_key(self, counter: CounterKey) -> str:
        """The Redis key of a counter (a rate window's: of the epoch holding its bucket)."""
        return self._words.key(counter)

    def reserve(
        self, request_id: str, lines: Sequence[ReserveLine], now: float, lease_until: float,
        need_group: bool = False,
    ) -> Awaitable[ReserveOutcome]:
        """Reserve every line or none (see `BudgetStore`)."""
        check_reserve_lines(lines)
        if not lines:
            return _answered(RESERVED)
        return self._reserve((request_id,), lines, now, lease_until, 1, "reserve", need_group=need_group)

    def reserve_spares(self, spare_ids: Sequence[str], lines: Sequence[ReserveLine], now: float,
                       lease_until: float, room: int, needed_now: bool = True) -> Awaitable[ReserveOutcome]:
        """`reserve` under each id, all or none, leaving room for `room` - 1 more (see `BudgetStore`); spares
        not needed now may wait a moment to share a write."""
        check_spare_ids(spare_ids, lines)
        check_reserve_lines(lines)
        return self._reserve(spare_ids, lines, now, lease_until, room, "reserve_spares", not needed_now)

    def _reserve(self, ids: Sequence[str], lines: Sequence[ReserveLine], now: float, lease_until: float,
                 room: int, operation: str, lazy: bool = False, need_group: bool = False) -> Awaitable[ReserveOutcome]:
        keys = [self._leases, *[f"{self._prefix}resv:{request_id}" for request_id in ids]]
        words, amount, amount_words = [], None, ""
        for line in lines:
            key_and_limits = self._words.lines.get((line.counter, line.limits, line.expires_at, line.group))
            if key_and_limits is None:
                key_and_limits = self._words.format_line(line)
            keys.append(key_and_limits[0])
            if line.amount is not amount:    # the lines of one request usually share one amount
                amount = line.amount
                amount_words = _amount_words(amount)
            words.append(f"{amount_words},{key_and_limits[1]}")
        args = [self._prefix, ids[0], f"[{now:.6f},{lease_until:.6f},{SWEEP_MAX},{self._ledger_max},{room},"
                f"{int(need_group)},{','.join(words)}]", *ids[1:]]
        first = ids[0]
        return self._call("reserve", keys, args, lambda reply: _reserve_outcome(reply, first), operation, lazy)

    def settle(self, request_id: str, actual: Sequence[tuple[CounterKey, Charge]], now: float,
               entry: LedgerEntry | None = None) -> Awaitable[Sequence[CounterState] | None]:
        """Turn the live reservation into `actual` spend (see `BudgetStore`); may wait a moment to share a write."""
        check_spend(actual)
        counters = [counter for counter, _ in actual]
        charges = {charge for _, charge in actual}
        amounts = (",".join([_amount_words(actual[0][1])] * len(actual)) if len(charges) == 1
                   else ",".join([_amount_words(charge) for _, charge in actual]))
        args = [self._prefix, request_id, f"[{now:.6f},{self._ledger_max},{_row_ms(entry)},{amounts}]",
                *_row(entry)]

        def states(reply: list[Any]) -> Sequence[CounterState] | None:
            if reply[0] == -1:
                raise ValueError(f"settle of {request_id!r} names a counter its reservation does not hold")
            return PackedStates(counters, reply[1]) if reply[0] == 1 else None

        keys = [*self._reservation_keys(request_id), *map(self._words.key, counters)]
        return self._call("settle", keys, args, states, lazy=True)

    def release(self, request_id: str, now: float, entry: LedgerEntry | None = None) -> Awaitable[bool]:
        """Drop the live reservation without spend (see `BudgetStore`); may wait a moment to share a write."""
        keys = self._reservation_keys(request_id)
        args = [self._prefix, request_id, f"[{now:.6f},{self._ledger_max},{_row_ms(entry)}]", *_row(entry)]
        return self._call("release", keys, args, _is_one, lazy=True)

    def record(
        self, request_id: str, lines: Sequence[tuple[CounterKey, Charge, float]], now: float,
        entry: LedgerEntry | None = None,
    ) -> Awaitable[bool]:
        """Add spend without a reservation, once per request id (see `BudgetStore`)."""
        check_record_lines(lines)
        spend = ",".join(f"{_amount_words(charge)},{ms(expires_at)}" for _, charge, expires_at in lines)
        args = [self._prefix, request_id, f"[{now:.6f},{self._ledger_max},{_row_ms(entry)},{spend}]",
                *_row(entry)]
        keys = [*self._reservation_keys(request_id), self._key("spent", request_id),
                *(self._words.key(counter) for counter, _, _ in lines)]
        return self._call("record", keys, args, _is_one)

    def file_rows(self, entries: Sequence[LedgerEntry]) -> Awaitable[None]:
        """Add ledger rows that move no counter (see `BudgetStore`); may wait a moment to share a write."""
        times = ",".join([str(self._ledger_max), *[str(_row_ms(entry)) for entry in entries]])
        args = [self._prefix, f"[{times}]", *[orjson.dumps(entry[1:]).decode() for entry in entries]]
        return self._call("file_rows", [self._key("ledger")], args, _nothing, lazy=True)

    def read(self, counters: Sequence[CounterKey], now: float) -> Awaitable[list[CounterState]]:
        """The state of each counter, in order."""
        keys = [self._leases, *map(self._words.key, counters)]
        shapes = "".join(f",{_shape(counter).rpartition(',')[0]}" for counter in counters)
        args = [self._prefix, f"[{now:.6f},{SWEEP_MAX},{self._ledger_max}{shapes}]"]
        return self._call("read", keys, args, lambda reply: list(PackedStates(counters, reply[0])))

    async def ledger(self, since: float, until: float, limit: int) -> list[LedgerEntry]:
        """The oldest `limit` rows with since <= time < until (this replica's settlements so far among them)."""
        if time_ms(until) <= time_ms(since):
            return []
        await self._driver.answered()
        return await self._records.ledger(since, until, limit)

    def claim_alert(self, key: str, payload: str, now: float, lease_until: float, expires_at: float) -> Awaitable[bool]:
        """Claim alert `key` until `lease_until` (see `BudgetStore`); it expires at `expires_at` on Redis's clock."""
        return self._records.claim_alert(key, payload, now, lease_until, expires_at)

    def alert_delivered(self, key: str, now: float) -> Awaitable[None]:
        """Mark alert `key` delivered (see `BudgetStore`)."""
        return self._records.alert_delivered(key)

    def pending_alerts(self, now: float, limit: int) -> Awaitable[list[tuple[str, str]]]:
        """Claimed, undelivered alerts whose lease ended, oldest lease first (see `BudgetStore`)."""
        return self._records.pending_alerts(now, limit)

    def canary_sync(self, canary: str, step: int, tallies: Sequence[ArmTally], now: float,
                    expires_at: float) -> Awaitable[CanaryRecord]:
        """Add the tallies of `step` and read the canary back (see `BudgetStore`)."""
        return self._canaries.sync(canary, step, tallies, now, expires_at)

    def canary_move(self, canary: str, from_step: int, to_step: int, status: CanaryStatus, now: float,
                    expires_at: float) -> Awaitable[bool]:
        """Move the canary on by compare-and-set on its step (see `BudgetStore`)."""
        return self._canaries.move(canary, from_step, to_step, status, now, expires_at)

    async def ping(self) -> bool:
        """True when Redis runs a script down the path budget operations take (the pipeline on Redis and
        Sentinel, when it runs), so a driver that cannot carry them is not ready, however PING on another
        connection fares."""
        try:
            return await self._call("ping", [self._leases], [], _is_one)
        except StoreError:
            return False

    async def close(self) -> None:
        """Close the script pipeline, the client and its connection pool."""
        try:
            await self._driver.aclose()
            await self._client.aclose()
        except Exception as exc:
            raise StoreError(f"closing redis failed: {type(exc).__name__}: {exc}") from exc

    def _key(self, kind: str, request_id: str | None = None) -> str:
        return f"{self._prefix}{kind}" if request_id is None else f"{self._prefix}{kind}:{request_id}"

    def _reservation_keys(self, request_id: str) -> list[str]:
        """The first KEYS of every script on a request: the leases and the request's reservation."""
        return [self._leases, f"{self._prefix}resv:{request_id}"]

    def _call(self, name: str, keys: list[str], args: list[str], parse: Callable[[Any], T],
              operation: str | None = None, lazy: bool = False) -> Awaitable[T]:
        """One call of script `name`, `parse`d, down the driver; observed as `operation` (default: the
        script's name). A `lazy` call is one nobody waits for yet: it may wait a moment to share a write."""
        try:
            return self._driver.submit(self._scripts[name], keys, args, parse, operation or name, lazy)
        except StoreError:
            raise
        except Exception as exc:             # the driver met a redis-py it does not know
            raise store_error(exc) from exc


class _CounterWords:
    """Counters' Redis keys and reserve lines' words, formatted once per window (they change with each)."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._keys: dict[CounterKey, str] = {}
        self.lines: dict[tuple[CounterKey, Limits, float, int], tuple[str, str]] = {}

    def key(self, counter: CounterKey) -> str:
        """The Redis key of a counter (a rate window's: of the epoch holding its bucket)."""
        key = self._keys.get(counter)
        if key is None:
            if len(self._keys) >= MAX_CACHED:
                self._keys.clear()
            key = self._keys[counter] = _key_of(self._prefix, counter)
        return key

    def format_line(self, line: ReserveLine) -> tuple[str, str]:
        """The counter's key and 'usd_limit,tokens_limit,requests_limit,expires_ms,k,n,bucket_ms,group'
        (limits -1: unlimited; see reserve.lua) of a line, kept in `lines`."""
        if len(self.lines) >= MAX_CACHED:
            self.lines.clear()
        usd, tokens, requests = (-1 if limit is None else limit for limit in line.limits)
        words = (self.key(line.counter),
                 f"{usd},{tokens},{requests},{ms(line.expires_at)},{_shape(line.counter)},{line.group}")
        self.lines[(line.counter, line.limits, line.expires_at, line.group)] = words
        return words


def connect_timeout(timeout_s: float) -> float:
    """How long opening a connection, or waiting for a free one, may take."""
    return max(1.0, 4 * timeout_s)


def create_redis_client(url: str, timeout_s: float, pool_size: int) -> RedisClient:
    """A client for redis://, rediss://, redis+cluster://host:port or redis+sentinel://host:port/service.

    Commands time out after `timeout_s` and the client never retries, so a frozen Redis turns into
    StoreError within about `timeout_s`. Opening a connection and waiting for a free one may take up to
    `connect_timeout(timeout_s)`: a burst of new connections on a busy event loop is load, not an outage
    (a Redis that is down refuses connections at once). Redis and Sentinel masters wait for a
    free connection from a pool of `pool_size`; a cluster has `pool_size` connections per node.
    """
    scheme, _, rest = url.partition("://")
    options: dict[str, Any] = {
        "socket_timeout": timeout_s, "socket_connect_timeout": connect_timeout(timeout_s),
        "health_check_interval": HEALTH_CHECK_S, "retry": Retry(NoBackoff(), 0),
    }
    if scheme in ("redis", "rediss"):
        pool = BlockingConnectionPool.from_url(url, max_connections=pool_size, timeout=connect_timeout(timeout_s),
                                               **options)
        return Redis.from_pool(pool)
    if scheme in ("redis+cluster", "rediss+cluster"):
        plain_scheme = scheme.removesuffix("+cluster")
        return RedisCluster.from_url(f"{plain_scheme}://{rest}", max_connections=pool_size, **options)
    if scheme == "redis+sentinel":
        return _sentinel_master(rest, timeout_s, pool_size, options)
    raise ValueError(f"unsupported store url {scheme}://: use redis, rediss, redis+cluster or redis+sentinel")


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """A Sentinel-managed pool that waits for a free connection like BlockingConnectionPool."""


def _sentinel_master(rest: str, timeout_s: float, pool_size: int, options: dict[str, Any]) -> Redis:
    """The master client of `[user:password@]host:port[,host:port...]/service_name`."""
    parts = urlsplit(f"//{rest}")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    service = parts.path.strip("/")
    if not service:
        raise ValueError("redis+sentinel url needs a service name: redis+sentinel://host:port/service_name")
    username, _, password = userinfo.partition(":")
    sentinel_options = {key: options[key] for key in ("socket_timeout", "socket_connect_timeout", "retry")}
    addresses = [_host_port(host) for host in hosts.split(",")]
    sentinel = Sentinel(addresses, sentinel_kwargs=sentinel_options, **options)
    return sentinel.master_for(
        service, connection_pool_class=_BlockingSentinelPool, max_connections=pool_size,
        timeout=connect_timeout(timeout_s),
        username=unquote(username) or None, password=unquote(password) or None,
    )


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def _reserve_outcome(reply: list[Any], first_id: str) -> ReserveOutcome:
    """The outcome of reserve.lua's reply (see its header)."""
    if reply[0] == 1:
        return RESERVED if len(reply) == 1 else ReserveOutcome(
            True, used=tuple(map(int, reply[2].split())), skipped=tuple(map(int, reply[1].split())))
    if reply[0] == -1:
        raise ValueError(f"request {first_id!r} (or another id of the call) already holds a reservation")
    wait = reply[4] if len(reply) > 4 else 0
    return ReserveOutcome(False, reply[1] - 1, UNITS[reply[2] - 1], held=reply[3] == 1,
                          retry_after=wait / 1000 if wait > 0 else (-1.0 if wait < 0 else None),
                          used=tuple(reply[5:6]))


def _key_of(prefix: str, counter: CounterKey) -> str:
    """The Redis key of a counter (see the key layout above)."""
    kind, (window, each) = kind_of(counter), split_each(counter.window_id)
    if kind == "rate":
        return f"{prefix}rate:{counter.policy}:{counter.period}:{each}:{epoch_of(int(window))}"
    if kind == "concurrent":
        return f"{prefix}conc:{counter.policy}:{each}"
    return f"{prefix}ctr:{counter.policy}:{counter.period}:{counter.window_id}"


def _shape(counter: CounterKey) -> str:
    """'k,n,bucket_ms' of a counter for the scripts: its bucket, buckets per window and bucket length
    (n 0: a budget counter, -1: requests in flight)."""
    kind = kind_of(counter)
    if kind == "rate":
        return f"{split_each(counter.window_id)[0]},{BUCKETS},{bucket_ms(counter.period)}"
    return "0,-1,0" if kind == "concurrent" else "0,0,0"


def _amount_words(charge: Charge) -> str:
    """'usd,tokens,requests' of one charge, for a script's JSON array."""
    return f"{charge.usd_nano},{charge.tokens},{charge.requests}"


def _row(entry: LedgerEntry | None) -> list[str]:
    """A ledger row as a script argument: the JSON array of its fields after `time`, which Redis stores as
    it is (see append_request_row in lib.lua)."""
    return [] if entry is None else [orjson.dumps(entry[1:]).decode()]


def _row_ms(entry: LedgerEntry | None) -> int:
    """The time a row is filed at (0 when there is no row)."""
    return 0 if entry is None else time_ms(entry.time)


def _is_one(reply: int) -> bool:
    return reply == 1


def _nothing(reply: Any) -> None:
    return None


def _answered(value: T) -> asyncio.Future[T]:
    """An awaitable that is already done."""
    future = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


_: type[BudgetStore] = RedisBudgetStore   # mypy proves the store keeps the contract
