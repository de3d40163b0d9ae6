"""Script calls on one Redis (or Sentinel master) connection, auto-pipelined.

`ScriptPipeline` holds ONE connection of its own, made by the client's connection pool (so Sentinel
master discovery, AUTH, SELECT, TLS and the RESP handshake stay redis-py's job) and opened on the first
call; calls made while it opens wait for it. Three parts share it:

- a caller (`submit`, `run`) packs its EVALSHA at once, queues it and gets a future;
- the writer sends everything queued during one event-loop turn in ONE write on the next turn, without
  waiting for the replies of earlier writes: Redis runs the calls in order, each its own atomic script;
- the reader reads the replies in order and answers the oldest outstanding call with each: a reply, or
  an error reply (ResponseError) that fails that call alone.

So a call costs a future, a packed command and a parsed reply, with no pool checkout and no timer; the
socket write and the read wake-up are paid once per loop turn, however many calls share it. A caller
that gives up after its call was written does not desynchronise the replies: its reply is read and
dropped. A call whose caller gave up before it was written is never sent.

NOSCRIPT (Redis restarted, SCRIPT FLUSH): one SCRIPT LOAD goes out behind the calls already written, and
every call that met NOSCRIPT is sent again, once, behind it.

Timeouts: no timer per call, one watchdog per connection, armed while calls are outstanding. It fires
when the OLDEST outstanding call has waited `timeout_s`: every outstanding call then fails with redis
TimeoutError and the connection is dropped. A failed connection (Redis killed, connection reset) fails
every outstanding call with ConnectionError as soon as the reader sees it. Either way calls still
queued, and later ones, go to a new connection; opening it is bounded by the client's
socket_connect_timeout and socket_timeout, and a refused connection fails the calls waiting for it at
once. So a frozen Redis answers every caller within about `timeout_s`, plus a connect timeout for the
calls that arrive after the drop.

Redis Cluster is not pipelined here (see `RedisBudgetStore`): its calls route and retry per node.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import math
from collections import deque
from collections.abc import Coroutine, Sequence
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["ScriptPipeline"]

TIMER_SLACK_S = 0.001   # event loops may run a timer this early (uvloop counts in milliseconds)


class _Call:
    """One command for the wire: its bytes, its caller's future (None for our SCRIPT LOAD), when it was sent."""

    __slots__ = ("packed", "future", "script", "sent_at", "retried")

    def __init__(self, packed: bytes, future: asyncio.Future[Any] | None, script: AsyncScript) -> None:
        self.packed, self.future, self.script = packed, future, script
        self.sent_at = 0.0
        self.retried = False


class ScriptPipeline:
    """EVALSHA calls auto-pipelined over one dedicated connection made by `client`'s pool.

    `timeout_s` bounds how long the oldest outstanding call may wait for its reply (None: no bound).
    """

    def __init__(self, client: Redis, timeout_s: float | None) -> None:
        self._pool = client.connection_pool
        encoder = self._pool.get_encoder()
        self._encoding, self._errors = encoder.encoding, encoder.encoding_errors
        self._timeout = timeout_s
        self._connection: AbstractConnection | None = None
        self._queue: list[_Call] = []             # not written yet
        self._pending: deque[_Call] = deque()     # written, in order, waiting for their replies
        self._loading: set[AsyncScript] = set()   # a SCRIPT LOAD of these is outstanding
        self._wake: asyncio.Future[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._disconnecting: set[asyncio.Task[None]] = set()
        self._closed = False

    async def run(self, script: AsyncScript, keys: Sequence[str], args: Sequence[str]) -> Any:
        """The script's reply; its ResponseError or the driver's error (ConnectionError, TimeoutError) is raised."""
        return await self.submit(script, keys, args)

    def submit(self, script: AsyncScript, keys: Sequence[str], args: Sequence[str]) -> asyncio.Future[Any]:
        """Queue one EVALSHA; the future gets what `run` would return or raise.

        Cancelling the future gives the call up. A caller that attaches a done-callback instead of awaiting
        must retrieve the future's exception.
        """
        if self._closed:
            raise RedisConnectionError("the script pipeline is closed")
        words = ("EVALSHA", script.sha, str(len(keys)), *keys, *args)
        future = asyncio.get_running_loop().create_future()
        self._queue.append(_Call(_resp(words, self._encoding, self._errors), future, script))
        self._wake_writer()
        return future

    async def aclose(self) -> None:
        """Fail what is queued or outstanding, stop the writer and the reader, disconnect."""
        self._closed = True
        if self._writer is not None:
            writer = self._writer
            writer.cancel()   # it fails what is still queued
            await asyncio.wait([writer])
        reader = self._reader
        self._drop(self._connection, RedisConnectionError("the script pipeline is closed"))
        waiting = [task for task in (reader, *self._disconnecting) if task is not None]
        if waiting:
            await asyncio.wait(waiting)

    def _wake_writer(self) -> None:
        """Make the writer send the queue on the next loop turn (starting it if it is not running)."""
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        elif self._wake is not None:
            self._wake.set_result(None)
            self._wake = None

    async def _write_loop(self) -> None:
        """Open the connection when there is none, then write what queued since the last write."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self._queue:
                    self._wake = loop.create_future()
                    await self._wake
                connection = self._connection if self._connection is not None else await self._open()
                if connection is not None:
                    await self._write(connection, loop)
        except BaseException as exc:   # closed (cancelled), or a bug: the queued calls must not hang
            queued, self._queue = self._queue, []
            closed = RedisConnectionError("the script pipeline is closed")
            _fail(queued, exc if isinstance(exc, Exception) else closed)
            raise
        finally:
            self._writer = self._wake = None

    async def _open(self) -> AbstractConnection | None:
        """A connected connection with its reader running; None when connecting failed the queued calls."""
        # Made by the pool, not checked out of it: a checkout held for ever would take one of pool_size
        # connections from the other commands for good (and starve them at pool_size 1).
        connection = self._pool.make_connection()
        try:
            await connection.connect()
        except BaseException as error:
            self._in_background(connection.disconnect(nowait=True))
            if not isinstance(error, Exception):
                raise
            queued, self._queue = self._queue, []
            _fail(queued, error)
            return None
        connection.socket_timeout = None   # the watchdog times the replies: no timer per read or write
        self._connection = connection
        self._reader = asyncio.get_running_loop().create_task(self._read_loop(connection))
        return connection

    async def _write(self, connection: AbstractConnection, loop: asyncio.AbstractEventLoop) -> None:
        """Send every queued call not given up meanwhile, in one write; they become outstanding."""
        now = loop.time()
        packets = []
        for call in self._queue:
            if call.future is None or not call.future.done():
                call.sent_at = now
                packets.append(call.packed)
                self._pending.append(call)
        self._queue = []
        if not packets:
            return
        if self._watchdog is None and self._timeout is not None:
            self._watchdog = loop.call_at(now + self._timeout, self._check_oldest)
        try:
            await connection.send_packed_command(packets, check_health=False)
        except Exception as error:
            self._drop(connection, error)

    async def _read_loop(self, connection: AbstractConnection) -> None:
        """Answer the oldest outstanding call with each reply, until the connection fails."""
        read = connection.read_response
        while True:
            try:
                # math.inf: no per-read timer (the watchdog bounds the wait); errors leave closing to _drop.
                reply = await read(timeout=math.inf, disconnect_on_error=False)
            except ResponseError as error:   # an error reply: it answers one call, the connection is fine
                reply = error
            except Exception as error:
                self._drop(connection, error)
                return
            if not self._answer(reply):
                self._drop(connection, InvalidResponse("Redis sent a reply no call was waiting for"))
                return

    def _answer(self, reply: Any) -> bool:
        """Settle the oldest outstanding call with `reply`; False when no call was outstanding."""
        if not self._pending:
            return False
        call = self._pending.popleft()
        future = call.future
        if future is None:   # our SCRIPT LOAD: the calls sent again behind it are under way
            self._loading.discard(call.script)
        elif future.done():   # its caller gave up
            pass
        elif not isinstance(reply, ResponseError):
            future.set_result(reply)
        elif isinstance(reply, NoScriptError) and not call.retried:
            self._send_again(call)
        else:
            future.set_exception(reply)
        return True

    def _send_again(self, call: _Call) -> None:
        """Queue a SCRIPT LOAD of the call's script (unless one is outstanding), then the call, once."""
        call.retried = True
        if call.script not in self._loading:
            self._loading.add(call.script)
            load = _resp(("SCRIPT", "LOAD", call.script.script), self._encoding, self._errors)
            self._queue.append(_Call(load, None, call.script))
        self._queue.append(call)
        self._wake_writer()

    def _check_oldest(self) -> None:
        """The watchdog: drop the connection once the oldest outstanding call has waited timeout_s."""
        self._watchdog = None
        if not self._pending or self._timeout is None:
            return
        loop = asyncio.get_running_loop()
        deadline = self._pending[0].sent_at + self._timeout
        if loop.time() < deadline - TIMER_SLACK_S:
            self._watchdog = loop.call_at(deadline, self._check_oldest)
            return
        self._drop(self._connection, RedisTimeoutError(f"Redis did not answer within {self._timeout:g} s"))

    def _drop(self, connection: AbstractConnection | None, error: Exception) -> None:
        """Fail every outstanding call with `error` and let the connection go; the next write opens another."""
        if connection is None or connection is not self._connection:
            return   # already dropped
        self._connection = None
        outstanding = list(self._pending)
        self._pending.clear()
        self._loading.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        self._in_background(connection.disconnect(nowait=True))
        if isinstance(error, RedisConnectionError) and not self._closed:
            # The pool's idle connections went to the same server and are most likely dead too, and
            # redis-py 8 no longer spots that at checkout: close them, so its next command reconnects.
            self._in_background(self._pool.disconnect(inuse_connections=False))
        _fail(outstanding, error)

    def _in_background(self, closing: Coroutine[Any, Any, None]) -> None:
        """Run a disconnect without waiting for it (aclose does wait)."""
        task = asyncio.get_running_loop().create_task(_quietly(closing))
        self._disconnecting.add(task)
        task.add_done_callback(self._disconnecting.discard)


async def _quietly(closing: Coroutine[Any, Any, None]) -> None:
    with contextlib.suppress(Exception):   # what it closes is gone either way
        await closing


def _fail(calls: Sequence[_Call], error: BaseException) -> None:
    for call in calls:
        if call.future is not None and not call.future.done():
            call.future.set_exception(error)


def _resp(words: Sequence[str], encoding: str, errors: str) -> bytes:
    """One command in the Redis protocol, for a fifth of the CPU of redis-py's pack_command.

    ASCII text (the usual case) is formatted as one str, its lengths in characters being its lengths in
    bytes; anything else is encoded word by word.
    """
    text = "".join([f"${len(word)}\r\n{word}\r\n" for word in words])
    if text.isascii() and (encoding == "utf-8" or codecs.lookup(encoding).name == "utf-8"):
        return f"*{len(words)}\r\n{text}".encode()
    parts = [b"*%d\r\n" % len(words)]
    for word in words:
        data = word.encode(encoding, errors)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)
