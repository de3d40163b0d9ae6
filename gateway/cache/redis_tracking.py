"""Redis tells this replica the name of every cache key anyone writes: the news that keeps a KeyIndex.

One connection of its own, opened like the client's others (AUTH, SELECT, TLS, Sentinel) but in RESP2,
so that it can subscribe to what it tracks: `CLIENT TRACKING ON REDIRECT <its own id> BCAST PREFIX
<prefix>`, then `SUBSCRIBE __redis__:invalidate`. From then on Redis sends the names of the keys under
the prefix that any client changed (written, deleted, expired or evicted: each may be held), a batch per
turn of its event loop. Once subscribed, a SCAN of the prefix adds the keys that were there before; only
when it is done is the index ready.

A lost connection, a setup or a PING (sent after HEALTH_S of silence) unanswered within HEALTH_S make
the index not ready at once (news may have been missed): it is emptied and filled again over a new
connection, RETRY_S later (doubling up to RETRY_MAX_S while attempts keep failing). A flushed database
(any: the news does not say which) empties it and fills it again over the same connection. A Redis that
cannot track keys (before 6, or CLIENT, SUBSCRIBE or SCAN not allowed to this user) leaves the index off
for good: every lookup reads the store.

The news includes this replica's own writes, so under load it comes with nearly every request. It is
read in batches: after each read the connection rests NEWS_EVERY_S before the next (what arrived
meanwhile waits in the socket), so the news costs one read and one pass per batch, not one per write.
A key another replica wrote may thus read as a miss here for that long after its news was sent: at
worst one more upstream call, charged as any. The news is read off the socket by hiredis directly (the
connection's transport is taken over, as the script pipeline does: see `redis_batch.take_over`): through redis-py's
reader each batch would cost about what the store read it saves.

Redis Cluster is not tracked (each node would need its own connection): there the index stays off.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, RedisError, ResponseError

from gateway.budget.redis_batch import take_over
from gateway.cache.key_index import KeyIndex
from gateway.clock import Clock

__all__ = ["KeyTracker", "HEALTH_S", "RETRY_S", "RETRY_MAX_S", "NEWS_EVERY_S"]

log = logging.getLogger("gateway.cache")
CHANNEL = b"__redis__:invalidate"
HEALTH_S = 5.0        # this long without news: a PING, which must be answered within as long again
RETRY_S = 0.5
RETRY_MAX_S = 30.0
NEWS_EVERY_S = 0.02   # the news connection rests this long after each read (see above)
SCAN_COUNT = 1000
_PASSING = ("LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN")   # error replies that pass: not "cannot track"


class _CannotTrack(Exception):
    """This client has no socket to take over (an in-memory Redis): tracking is off for good."""


class KeyTracker:
    """Keeps `index` with the keys under `prefix` on `client`'s Redis, from `start` until `close`."""

    def __init__(self, client: Redis, index: KeyIndex, prefix: str, clock: Clock) -> None:
        self._client = client
        self._index = index
        self._prefix = prefix.encode()
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._news: _News | None = None
        self._filling: asyncio.Task[None] | None = None
        self._filled = False           # the index got ready since the last failure was logged
        self._closed = False

    def start(self) -> None:
        """Start tracking (once, unless closed; in the running loop)."""
        if self._task is None and not self._closed:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop tracking for good: the index is not ready from now on."""
        self._closed = True
        self._index.ready = False
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait((self._task,))     # (waiting, not awaiting: a cancel of our caller stays its own)

    async def _run(self) -> None:
        delay, failing = RETRY_S, False
        while True:
            began = self._clock.monotonic()
            try:
                await self._track()
            except (_CannotTrack, ResponseError) as error:
                if not str(error).startswith(_PASSING):
                    log.warning("response cache key index off: Redis cannot track keys here (%s); every "
                                "lookup reads the store", error)
                    return
            except (RedisError, OSError, TimeoutError) as error:
                if self._filled or not failing:     # once per streak of failures
                    log.warning("response cache key index without news from Redis (%s): lookups read the "
                                "store until it is back", type(error).__name__)
                failing, self._filled = True, False
            except Exception:
                log.exception("response cache key index failed: off, every lookup reads the store")
                return
            finally:
                self._index.ready = False
                self._index.clear()
                self._hang_up()
            if self._clock.monotonic() - began >= RETRY_MAX_S:   # it had held a while: retry soon
                delay = RETRY_S
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _track(self) -> None:
        """Subscribe to the news, fill the index, then keep it until the connection fails."""
        pool = self._client.connection_pool
        connection = pool.connection_class(**{**pool.connection_kwargs, "protocol": 2, "health_check_interval": 0})
        async with asyncio.timeout(HEALTH_S):    # a Redis that accepts and never answers is a failed attempt
            try:
                writer = await take_over(connection)
            except RuntimeError as error:
                raise _CannotTrack(str(error)) from error
            self._news = news = _News(writer, self._heard, self._lost)
            writer.transport.set_protocol(news)
            if writer.transport.is_closing():
                raise RedisConnectionError("tracking connection closed while it was opened")
            own_id = await news.ask(b"CLIENT", b"ID")
            await news.ask(b"CLIENT", b"TRACKING", b"ON", b"REDIRECT", b"%d" % own_id, b"BCAST",
                           b"PREFIX", self._prefix)
            await news.ask(b"SUBSCRIBE", CHANNEL)
        self._refill()
        try:
            await self._watch(news)
        finally:
            self._stop_filling()

    def _refill(self) -> None:
        """(Re)start filling the index from a SCAN (the news is coming meanwhile)."""
        self._stop_filling()
        self._filling = asyncio.get_running_loop().create_task(self._fill())

    def _stop_filling(self) -> None:
        filling, self._filling = self._filling, None
        if filling is not None:
            filling.cancel()

    async def _fill(self) -> None:
        """Add the keys the store held before the news began; then the index is ready."""
        start = len(self._prefix)
        match = _glob_escape(self._prefix) + b"*"
        async for name in self._client.scan_iter(match=match, count=SCAN_COUNT):
            raw = name if isinstance(name, bytes) else name.encode()
            self._index.add(raw[start:].decode("utf-8", "replace"), self._clock.now())
        self._index.ready = self._filled = True
        log.info("response cache key index ready: %d keys", len(self._index))

    async def _watch(self, news: _News) -> None:
        """Until the connection ends (raised): a failed fill is raised; silence gets a PING."""
        while True:
            heard, filling = news.heard, self._filling
            waits: tuple[asyncio.Future[Any], ...] = (news.ended,) if filling is None or filling.done() \
                else (news.ended, filling)
            await asyncio.wait(waits, timeout=HEALTH_S, return_when=asyncio.FIRST_COMPLETED)
            if news.ended.done():
                raise news.ended.exception() or RedisConnectionError("tracking connection closed")
            if filling is not None and filling is self._filling and filling.done():
                self._filling = None
                if not filling.cancelled() and filling.exception() is not None:
                    raise filling.exception()  # type: ignore[misc]
                continue
            if news.heard == heard:
                async with asyncio.timeout(HEALTH_S):
                    await news.ask(b"PING")

    def _heard(self, names: list[bytes] | None) -> None:
        """A batch of news: the keys named may be held now. None: a database was flushed (any database:
        the news does not say which), so the index is emptied and filled again over the same connection."""
        if names is None:
            self._index.ready = False
            self._index.clear()
            self._refill()
            return
        start = len(self._prefix)
        self._index.add_all([name[start:].decode("utf-8", "replace") for name in names], self._clock.now())

    def _lost(self) -> None:
        """The connection ended: the index is not ready from this moment (news may be missed)."""
        self._index.ready = False

    def _hang_up(self) -> None:
        self._stop_filling()
        news, self._news = self._news, None
        if news is not None:
            news.close()


class _News(asyncio.Protocol):
    """The taken-over tracking connection: replies to its own commands in order, news to `on_news`."""

    def __init__(self, writer: asyncio.StreamWriter, on_news: Callable[[list[bytes] | None], None],
                 on_lost: Callable[[], None]) -> None:
        self._writer = writer                  # kept alive with its transport (see redis_batch._take_writer)
        self.transport: asyncio.Transport = writer.transport  # type: ignore[assignment]
        self._reader = hiredis.Reader(protocolError=InvalidResponse, replyError=ResponseError)
        self._on_news = on_news
        self._on_lost = on_lost
        self._asked: deque[asyncio.Future[Any]] = deque()
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.heard = 0                         # messages read so far
        self._resting = False

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
        except Exception as error:          # bytes that are no RESP
            self._end(error)
            return
        if not self._resting:
            self._resting = True
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(NEWS_EVERY_S, self._wake)

    def _wake(self) -> None:
        """Read again what arrived while the connection rested."""
        self._resting = False
        if not self.ended.done():
            self.transport.resume_reading()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(RedisConnectionError(f"tracking connection lost{f': {exc}' if exc else ''}"))

    def close(self) -> None:
        """Close the connection (what waits on it fails)."""
        self._end(RedisConnectionError("tracking connection closed"))

    def _end(self, error: Exception) -> None:
        self._on_lost()
        if not self.ended.done():
            self.ended.set_exception(error)
            self.ended.exception()           # retrieved: nobody may be waiting any more
        while self._asked:
            reply = self._asked.popleft()
            if not reply.done():
                reply.set_exception(error)
                reply.exception()
        self.transport.close()


def _glob_escape(text: bytes) -> bytes:
    """`text` matched literally by a SCAN pattern."""
    return b"".join(b"\\" + bytes((c,)) if c in b"*?[]\\" else bytes((c,)) for c in text)
