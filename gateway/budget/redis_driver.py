"""How the Redis store sends its Lua scripts: one driver interface, two drivers, chosen once at start.

- `ScriptPipeline` (redis_batch): every call auto-pipelined on one connection whose transport it takes
  over from redis-py (private internals, checked for the releases pyproject.toml pins). Calls are
  answered in order, each within the store's timeout, and calls nobody waits for yet share writes.
- `PublicApiDriver`: each call one EVALSHA through redis-py's public API on a pool connection. What Redis
  Cluster needs (each call is routed to its node), what an in-memory client offers (fakeredis), and what
  a redis-py release outside the pipeline's checked range gets.

`choose_driver` picks the pipeline when the client and the installed redis-py fit it and logs which one
runs. Either way every failure reaches the store's caller as StoreError: a driver error, an error reply,
or a redis-py whose internals turn out not to fit at run time (an outage, not a 500).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import redis
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from gateway.budget.redis_batch import CallObserver, Parse, ScriptPipeline
from gateway.budget.store import PLAIN, StoreCapabilities
from gateway.errors import StoreError

__all__ = ["ScriptDriver", "PublicApiDriver", "choose_driver", "store_error", "PIPELINE_CHECKED"]

log = logging.getLogger("gateway.budget")
PIPELINE_CHECKED = ((5, 0, 1), (9, 0, 0))   # redis-py releases the pipeline was checked on: [from, to)
RedisClient = Redis | RedisCluster
T = TypeVar("T")


class ScriptDriver(Protocol):
    """Sends the store's script calls; `observe` hears each call named by an `operation` (time, failure)."""

    observe: CallObserver | None

    @property
    def capabilities(self) -> StoreCapabilities:
        """Order, time bound and write sharing of the calls (`self_timed` is the store's to say)."""

    def submit(self, script: AsyncScript, keys: Sequence[str], args: Sequence[str], parse: Parse | None = None,
               operation: str | None = None, lazy: bool = False) -> Awaitable[Any]:
        """One EVALSHA; the awaitable gives `parse` of its reply. `lazy`: nobody waits for it yet, so it
        may wait a moment to share a write."""

    def send_queued(self) -> None:
        """Send the calls waiting to share a write now."""

    async def answered(self) -> None:
        """Wait until every call made so far is answered or failed (what a read on another connection needs)."""

    async def aclose(self) -> None:
        """Fail what is still queued and drop the driver's own connections."""


class PublicApiDriver:
    """Script calls (and the store's other commands) through redis-py's public API, one command each.

    Calls run side by side on pool connections (at most `max_in_flight` at once when given: RedisCluster's
    per-node pool raises instead of waiting), so they may be answered out of order; each is bounded by
    the client's socket timeout, not by this driver.
    """

    capabilities = PLAIN

    def __init__(self, client: RedisClient, max_in_flight: int | None = None) -> None:
        self.observe: CallObserver | None = None
        self._client = client
        self._in_flight = asyncio.Semaphore(max_in_flight) if max_in_flight else None
        self._cluster_pending = isinstance(client, RedisCluster)
        self._cluster_lock = asyncio.Lock()

    def submit(self, script: AsyncScript, keys: Sequence[str], args: Sequence[str], parse: Parse | None = None,
               operation: str | None = None, lazy: bool = False) -> Awaitable[Any]:
        """One EVALSHA, sent when awaited (`lazy` changes nothing: there is no write to share)."""
        return self._run(script, keys, args, parse, operation)

    def send_queued(self) -> None:
        """Nothing waits here: every call is sent when it is awaited."""

    async def answered(self) -> None:
        """Nothing to wait for: a call is answered before its caller goes on."""

    async def aclose(self) -> None:
        """Nothing of its own to close: the store closes the client."""

    async def command(self, name: str, command: Callable[[], Awaitable[T]]) -> T:
        """Run one command; every error of the driver (or of a driver release it does not fit) is StoreError."""
        try:
            if self._cluster_pending:
                await self._initialize_cluster()
            async with self._in_flight or contextlib.nullcontext():
                return await command()
        except Exception as exc:
            raise StoreError(f"redis {name} failed: {type(exc).__name__}: {exc}") from exc

    async def evalsha(self, script: AsyncScript, keys: Sequence[str], args: Sequence[str]) -> Any:
        """EVALSHA through execute_command (cheaper than AsyncScript.__call__); SCRIPT LOAD on NOSCRIPT."""
        try:
            return await self._client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:   # Redis restarted or SCRIPT FLUSH: the script did not run
            script.sha = await self._client.script_load(script.script)
            return await self._client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

    async def _run(self, script: AsyncScript, keys: Sequence[str], args: Sequence[str], parse: Parse | None,
                   operation: str | None) -> Any:
        started, failed = time.perf_counter(), True
        try:
            reply = await self.command(operation or "script", lambda: self.evalsha(script, keys, args))
            result = reply if parse is None else parse(reply)
            failed = False
            return result
        finally:
            if operation is not None and self.observe is not None:
                self.observe(operation, time.perf_counter() - started, failed)

    async def _initialize_cluster(self) -> None:
        """Discover the cluster once: redis-py's RedisCluster races when first commands run concurrently."""
        assert isinstance(self._client, RedisCluster)
        async with self._cluster_lock:
            if self._cluster_pending:
                await self._client.initialize()
                self._cluster_pending = False


def choose_driver(client: RedisClient, public: PublicApiDriver) -> ScriptDriver:
    """The script pipeline when `client` and the installed redis-py fit it, else `public`; logs which."""
    unfit, surprising = _unfit_for_pipeline(client)
    if not isinstance(client, Redis) or unfit:
        log.log(logging.WARNING if surprising else logging.INFO,
                "budget store: Lua scripts go through redis-py's public API, one command each: %s", unfit)
        return public
    log.info("budget store: Lua scripts auto-pipelined on one connection (redis-py %s)", redis.__version__)
    # create_redis_client made socket_timeout the store's timeout_s: the pipeline's bound on a reply
    timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
    return ScriptPipeline(client, timeout, wrap_error=store_error)


def _unfit_for_pipeline(client: RedisClient) -> tuple[str, bool]:
    """Why the pipeline cannot carry `client`'s calls ("" when it can), and whether that is a surprise."""
    if not isinstance(client, Redis):
        return "Redis Cluster routes each call to its node", False
    connection = client.connection_pool.connection_class
    if not (issubclass(connection, AbstractConnection) and connection.__module__.startswith("redis.")):
        return f"{connection.__module__}.{connection.__qualname__} is no redis-py socket connection", False
    release = tuple(int(part) for part in re.findall(r"\d+", redis.__version__)[:3])
    oldest, newest = PIPELINE_CHECKED
    if not oldest <= release < newest:
        checked = f"{'.'.join(map(str, oldest))} to {newest[0] - 1}.x"
        return f"redis-py {redis.__version__} is not among the releases the pipeline was checked on, {checked}", True
    return "", False


def store_error(error: Exception) -> StoreError:
    """A driver error, an error reply, or any failure of the driver's internals, as the store raises it.

    The pipeline takes over private parts of redis-py (see redis_batch): a release it does not fit fails
    with AttributeError or RuntimeError, and that must reach the engine as a store failure (outage mode,
    /readyz), never as a 500.
    """
    if isinstance(error, StoreError):
        return error
    return StoreError(f"redis failed: {type(error).__name__}: {error}")
