"""Redis tells this replica the name of every cache key anyone writes: the news that keeps a KeyIndex.

One connection of its own, opened like the client's others (AUTH, SELECT, TLS, Sentinel) but in RESP2,
so that it can subscribe to what it tracks: `CLIENT TRACKING ON REDIRECT <its own id> BCAST PREFIX
<prefix>`, then `SUBSCRIBE __redis__:invalidate`. From then on Redis sends the names of the keys under
the prefix that any client changed (written, deleted, expired or evicted: each may be held), a batch per
turn of its event loop. Once subscribed, a SCAN of the prefix adds the keys that were there before; only
when it is done is the index ready.

A flushed database, a lost connection, or no answer to a PING within HEALTH_S of silence make the index
not ready at once (news may have been missed): it is emptied and filled again over a new connection,
RETRY_S later (doubling up to RETRY_MAX_S while it keeps failing). A Redis that cannot track keys (before
6, or CLIENT not allowed to this user) leaves the index off for good: every lookup reads the store.

The news includes this replica's own writes. It is read off the socket by hiredis directly (the
connection's transport is taken over, as the script pipeline does: see `take_writer`): through redis-py's
reader each batch would cost about what the store read it saves.

Redis Cluster is not tracked (each node would need its own connection): there the index stays off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, RedisError, ResponseError

from gateway.budget.redis_batch import take_writer
from gateway.cache.key_index import KeyIndex
from gateway.clock import Clock

__all__ = ["KeyTracker", "HEALTH_S", "RETRY_S", "RETRY_MAX_S"]

log = logging.getLogger("gateway.cache")
CHANNEL = b"__redis__:invalidate"
HEALTH_S = 5.0        # this long without news: a PING, which must be answered within as long again
RETRY_S = 0.5
RETRY_MAX_S = 30.0
SCAN_COUNT = 1000
_PASSING = ("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN")   # error replies that pass: not "cannot track"


class _Flushed(Exception):
    """A database was flushed: the index is filled again."""


class KeyTracker:
    """Keeps `index` with the keys under `prefix` on `client`'s Redis, from `start` until `close`."""

    def __init__(self, client: Redis, index: KeyIndex, prefix: str, clock: Clock) -> None:
        self._client = client
        self._index = index
        self._prefix = prefix.encode()
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._news: _News | None = None

    def start(self) -> None:
        """Start tracking (once; in the running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop tracking: the index is not ready from now on."""
        self._index.ready = False
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        delay = RETRY_S
        while True:
            try:
                await self._track()
            except _Flushed:
                delay = 0.0
            except ResponseError as error:
                if not str(error).startswith(_PASSING):
                    log.warning("response cache key index off: Redis cannot track keys (%s); every lookup "
                                "reads the store", error)
                    return
            except (RedisError, OSError, TimeoutError) as error:
                if self._index.ready:
                    log.warning("response cache key index lost its Redis connection (%s): lookups read the "
                                "store until it is back", type(error).__name__)
                    delay = RETRY_S
            except RuntimeError as error:       # a client with no socket to take over (an in-memory Redis)
                log.warning("response cache key index off: %s; every lookup reads the store", error)
                return
            except Exception:
                log.exception("response cache key index failed: off, every lookup reads the store")
                return
            finally:
                self._index.ready = False
                self._index.clear()
                self._hang_up()
            await asyncio.sleep(delay)
            delay = min(max(delay * 2, RETRY_S), RETRY_MAX_S)

    async def _track(self) -> None:
        """Subscribe to the news, fill the index, then keep it until the connection fails or a flush."""
        pool = self._client.connection_pool
        connection = pool.connection_class(**{**pool.connection_kwargs, "protocol": 2, "health_check_interval": 0})
        try:
            await connection.connect()
            writer = take_writer(connection)
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.disconnect(nowait=True)
            raise
        self._news = news = _News(writer, self._heard)
        writer.transport.set_protocol(news)
        own_id = await news.ask(b"CLIENT", b"ID")
        await news.ask(b"CLIENT", b"TRACKING", b"ON", b"REDIRECT", b"%d" % own_id, b"BCAST", b"PREFIX", self._prefix)
        await news.ask(b"SUBSCRIBE", CHANNEL)
        filling = asyncio.get_running_loop().create_task(self._fill())
        try:
            await self._watch(news, filling)
        finally:
            filling.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await filling

    async def _fill(self) -> None:
        """Add the keys the store held before the news began; then the index is ready."""
        start = len(self._prefix)
        async for name in self._client.scan_iter(match=self._prefix + b"*", count=SCAN_COUNT):
            self._index.add(_text(name)[start:], self._clock.now())
        self._index.ready = True
        log.info("response cache key index ready: %d keys", len(self._index))

    async def _watch(self, news: _News, filling: asyncio.Task[None]) -> None:
        """Until the connection ends (raised): the fill's failure is raised; silence gets a PING."""
        while True:
            heard = news.heard
            done, _ = await asyncio.wait((news.ended, filling) if not filling.done() else (news.ended,),
                                         timeout=HEALTH_S, return_when=asyncio.FIRST_COMPLETED)
            if news.ended in done:
                raise news.ended.exception() or RedisConnectionError("tracking connection closed")
            if filling in done:
                if filling.exception() is not None:
                    raise filling.exception()  # type: ignore[misc]
                continue
            if news.heard == heard:
                async with asyncio.timeout(HEALTH_S):
                    await news.ask(b"PING")

    def _heard(self, names: list[bytes] | None) -> None:
        """A batch of news: the keys named may be held now (None: a database was flushed)."""
        if names is None:
            raise _Flushed()
        start = len(self._prefix)
        self._index.add_all([name[start:].decode("utf-8", "replace") for name in names], self._clock.now())

    def _hang_up(self) -> None:
        news, self._news = self._news, None
        if news is not None:
            news.close()


class _News(asyncio.Protocol):
    """The taken-over tracking connection: replies to its own commands in order, news to `on_news`."""

    def __init__(self, writer: asyncio.StreamWriter, on_news: Callable[[list[bytes] | None], None]) -> None:
        self._writer = writer                  # kept alive with its transport (see take_writer)
        self.transport: asyncio.Transport = writer.transport  # type: ignore[assignment]
        self._reader = hiredis.Reader(protocolError=InvalidResponse, replyError=ResponseError)
        self._on_news = on_news
        self._asked: deque[asyncio.Future[Any]] = deque()
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.heard = 0                         # messages read so far

    def ask(self, *words: bytes) -> asyncio.Future[Any]:
        """Send one command; its reply (an error reply raised)."""
        if self.ended.done():
            raise RedisConnectionError("tracking connection closed")
        reply = asyncio.get_running_loop().create_future()
        self._asked.append(reply)
        self.transport.write(hiredis.pack_command(words))  # type: ignore[arg-type]
        return reply

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        try:
            while (message := reader.gets()) is not False:
                self.heard += 1
                if isinstance(message, list) and len(message) == 3 and message[0] == b"message":
                    self._on_news(message[2])
                elif self._asked:
                    reply = self._asked.popleft()
                    if not reply.done():
                        reply.set_exception(message) if isinstance(message, Exception) else reply.set_result(message)
        except Exception as error:          # a flush, or bytes that are no RESP
            self._end(error)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(RedisConnectionError(f"tracking connection lost{f': {exc}' if exc else ''}"))

    def close(self) -> None:
        """Close the connection (what waits on it fails)."""
        self._end(RedisConnectionError("tracking connection closed"))

    def _end(self, error: Exception) -> None:
        if not self.ended.done():
            self.ended.set_exception(error)
            self.ended.exception()           # retrieved: nobody may be waiting any more
        while self._asked:
            reply = self._asked.popleft()
            if not reply.done():
                reply.set_exception(error)
                reply.exception()
        self.transport.close()


def _text(name: bytes | str) -> str:
    """A key's name as the text its index entry is hashed from (SCAN answers bytes or, decoding, text)."""
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else name
