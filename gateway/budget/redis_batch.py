"""Script calls on one Redis (or Sentinel master) connection, auto-pipelined.

`ScriptPipeline` holds ONE connection of its own. redis-py's pool makes and opens it (so Sentinel
master discovery, AUTH, SELECT, TLS and the RESP handshake stay redis-py's job); then the pipeline
takes its transport over and speaks to it directly:

- a caller (`submit`) packs its EVALSHA at once and gets a future; the first call of a loop turn is
  written at once when at most QUIET_OUTSTANDING calls are outstanding (a quiet gateway waits for no
  loop turn), any other is queued;
- everything queued during one event-loop turn goes out in ONE write at the end of the turn, without
  waiting for the replies of earlier writes: Redis runs the calls in order, each its own atomic script;
- a `lazy` call (one nobody waits for yet: a request's settlement, spares for a pool still half full)
  may wait up to LAZY_FLUSH_S for company: it goes out with the next call that is not lazy, or when that
  time is up.
  On this kind of machine a write to Redis costs more in the kernel (waking Redis up) than packing a
  dozen calls, so under load a few requests' calls share each write;
- the transport's protocol feeds what arrives to hiredis and answers the oldest outstanding call with
  each reply: a result, or an error reply that fails that call alone.

So a call costs a future, a packed command and a parsed reply: no task, no stream reader, no timer
and no pool checkout per call; the socket write and the read are paid once per loop turn (or per lazy
wait), however many calls share it. A caller that gives up after its call was written does not
desynchronise the replies: its reply is read and dropped. A call whose caller gave up before it was
written is never sent.

NOSCRIPT (Redis restarted, SCRIPT FLUSH): one SCRIPT LOAD goes out behind the calls already written, and
every call that met NOSCRIPT is sent again, once, behind it.

Timeouts: no timer per call, one watchdog per connection, armed while calls are outstanding. It fires
when the OLDEST outstanding call has waited `timeout_s` (and still waits one loop turn later, in case
its reply came in that turn): every outstanding call then fails with redis TimeoutError and the
connection is dropped. A lost connection fails every outstanding call with ConnectionError at once.
Either way calls still queued, and later ones, go to a new connection; opening it is bounded by the
client's socket_connect_timeout and socket_timeout, and a refused connection fails the calls waiting
for it at once. So a frozen Redis answers every caller within about `timeout_s`, plus a connect
timeout for the calls that arrive after the drop.

Redis Cluster is not pipelined here (see `gateway.budget.redis_driver`): its calls route and retry per node.

Driver internals: the connection's `_reader`/`_writer` (redis-py >= 4.2), `ConnectionPool.make_connection`,
`connection_kwargs`, `get_encoder` and `disconnect(nowait=...)`; the store needs `Redis.from_pool`
(5.0.1). pyproject.toml pins the releases checked (`redis>=5.0.1,<9`), and the store uses the pipeline
only on those (`redis_driver.choose_driver`). Any failure of those parts reaches the caller through
`wrap_error`, like a lost connection, never as an error of its own.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.budget.store import StoreCapabilities

__all__ = ["ScriptPipeline", "CallObserver", "Parse", "take_over"]

TIMER_SLACK_S = 0.001   # event loops may run a timer this early (uvloop counts in milliseconds)
QUIET_OUTSTANDING = 1   # at most this many calls outstanding: a call is written at once, not a loop turn later
LAZY_FLUSH_S = 0.002    # the longest a lazy call waits to share a write

Parse = Callable[[Any], Any]
WrapError = Callable[[Exception], Exception]
CallObserver = Callable[[str, float, bool], None]   # (operation, seconds from submit to answer, failed)


class _Call:
    """One command for the wire: its bytes, its caller's future (None for our SCRIPT LOAD), its timings."""

    __slots__ = ("packed", "future", "script", "parse", "operation", "started", "sent_at", "retried", "lazy")

    def __init__(self, packed: bytes, future: asyncio.Future[Any] | None, script: AsyncScript,
                 parse: Parse | None = None, operation: str | None = None, started: float = 0.0,
                 lazy: bool = False) -> None:
        self.packed, self.future, self.script, self.parse = packed, future, script, parse
        self.operation, self.started = operation, started
        self.sent_at = 0.0
        self.retried = False
        self.lazy = lazy   # its time is observed from its write, not from its wait for company


class ScriptPipeline:
    """EVALSHA calls auto-pipelined over one dedicated connection made by `client`'s pool.

    `timeout_s` bounds how long the oldest outstanding call may wait for its reply (None: no bound).
    `wrap_error` turns the driver's errors (and error replies) into the caller's exceptions; `observe`
    hears how long each call named by an `operation` took (a lazy one from its write), and whether it
    failed.
    """

    def __init__(self, client: Redis, timeout_s: float | None, *, wrap_error: WrapError | None = None,
                 observe: CallObserver | None = None) -> None:
        self._wrap_error: WrapError = wrap_error or (lambda error: error)
        self.observe = observe
        self._pool = client.connection_pool
        encoder = self._pool.get_encoder()
        self._encoding, self._errors = encoder.encoding, encoder.encoding_errors
        self._utf8 = _is_utf8(self._encoding)
        self._timeout = timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._protocol: _Connection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._queue: list[_Call] = []             # not written yet
        self._loading: set[AsyncScript] = set()   # a SCRIPT LOAD of these is outstanding
        self._flush_scheduled = False
        self._lazy_flush: asyncio.TimerHandle | None = None   # the flush a lazy call is waiting for
        self._background: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def timeout(self) -> float | None:
        """How long the oldest outstanding call may wait for its reply (None: no bound)."""
        return self._timeout

    @property
    def capabilities(self) -> StoreCapabilities:
        """Calls answered in order (within the timeout, when there is one); lazy calls share writes."""
        return StoreCapabilities(in_order=True, bounds_time=self._timeout is not None, shares_writes=True)

    async def run(self, script: AsyncScript, keys: Sequence[str], args: Sequence[str]) -> Any:
        """The script's reply; its ResponseError or the driver's error (ConnectionError, TimeoutError) is raised."""
        return await self.submit(script, keys, args)

    def submit(self, script: AsyncScript, keys: Sequence[str], args: Sequence[str],
               parse: Parse | None = None, operation: str | None = None, lazy: bool = False) -> asyncio.Future[Any]:
        """Queue one EVALSHA; the future gets what `run` would return or raise (`parse` of the reply, if given).

        A `lazy` call may wait up to LAZY_FLUSH_S to go out with others; calls still go out in the order
        they were made. Cancelling the future gives the call up. A caller that attaches a done-callback
        instead of awaiting must retrieve the future's exception.
        """
        if self._closed:
            raise self._wrap_error(RedisConnectionError("the script pipeline is closed"))
        loop = self._loop or self._bind_loop()
        future = loop.create_future()
        started = loop.time() if operation is not None and self.observe is not None else 0.0
        call = _Call(self._evalsha(script, keys, args), future, script, parse, operation, started, lazy)
        protocol = self._protocol
        if lazy:
            self._queue.append(call)
            if not self._flush_scheduled and self._lazy_flush is None:
                self._lazy_flush = loop.call_at(loop.time() + LAZY_FLUSH_S, self._flush)
        elif protocol is not None and not self._flush_scheduled and len(protocol.pending) <= QUIET_OUTSTANDING:
            # A quiet gateway (at one connection the next request reserves while the last one's settle
            # waits, queued or outstanding): send it at once, behind the lazy calls still queued, rather
            # than a loop turn later; the calls made in the rest of this turn go out together at its end.
            queued, self._queue = self._queue, []
            queued.append(call)
            protocol.write(queued, started or loop.time())
            self._schedule_flush()
        else:
            self._queue.append(call)
            self._schedule_flush()
        return future

    def send_queued(self) -> None:
        """Send the calls queued so far now (lazy ones included) instead of at their flush."""
        if self._queue:
            self._flush()

    async def answered(self) -> None:
        """Send what is queued now and wait until every call made so far is answered or failed (each
        within twice the timeout; with no timeout, for as long as they take): what a command on another
        connection waits for to see their effects."""
        pending = self._protocol.pending if self._protocol is not None else ()
        waiting = [call.future for call in (*pending, *self._queue)
                   if call.future is not None and not call.future.done()]
        self.send_queued()
        if waiting:
            await asyncio.wait(waiting, timeout=None if self._timeout is None else 2 * self._timeout)

    async def aclose(self) -> None:
        """Fail what is queued or outstanding, drop the connection, wait for what it started."""
        self._closed = True
        self._cancel_lazy_flush()
        closed = RedisConnectionError("the script pipeline is closed")
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._connecting
        queued, self._queue = self._queue, []
        self._fail(queued, closed)
        self._drop(self._protocol, closed)
        if self._background:
            await asyncio.wait(list(self._background))

    def _evalsha(self, script: AsyncScript, keys: Sequence[str], args: Sequence[str]) -> bytes:
        """The packed EVALSHA."""
        return _resp(("EVALSHA", script.sha, str(len(keys)), *keys, *args), self._utf8, self._encoding, self._errors)

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        self._loop = asyncio.get_running_loop()
        return self._loop

    def _flush(self) -> None:
        """Write every queued call not given up meanwhile, in one write; open the connection if there is none."""
        self._flush_scheduled = False
        self._cancel_lazy_flush()
        protocol = self._protocol
        if protocol is None:
            if self._queue and self._connecting is None and not self._closed:
                self._connecting = self._in_background(self._open())
            return
        assert self._loop is not None
        queued, self._queue = self._queue, []
        protocol.write(queued, self._loop.time())

    def _send(self, protocol: _Connection, data: bytes) -> None:
        """The one place bytes go to Redis."""
        protocol.transport.write(data)

    async def _open(self) -> None:
        """Open a connection through the pool, take its transport over, then send what queued meanwhile."""
        try:
            # made by the pool, not checked out of it: a checkout held for ever would take one of pool_size
            # connections from the other commands for good, and starve them at pool_size 1
            writer = await take_over(self._pool.make_connection())
        except Exception as error:   # a driver error, or a redis-py release whose internals differ
            self._connecting = None
            queued, self._queue = self._queue, []
            self._fail(queued, error)
            return
        self._connecting = None
        assert self._loop is not None
        self._protocol = _Connection(self, writer, self._loop, self._timeout)
        writer.transport.set_protocol(self._protocol)
        self._flush()

    def _send_again(self, call: _Call) -> None:
        """Queue a SCRIPT LOAD of the call's script (unless one is outstanding), then the call, once."""
        call.retried = True
        if call.script not in self._loading:
            self._loading.add(call.script)
            source = call.script.script    # registered as text (redis-py's type allows bytes too)
            source = source if isinstance(source, str) else bytes(source).decode()
            load = _resp(("SCRIPT", "LOAD", source), self._utf8, self._encoding, self._errors)
            self._queue.append(_Call(load, None, call.script))
        self._queue.append(call)
        self._schedule_flush()

    def _cancel_lazy_flush(self) -> None:
        if self._lazy_flush is not None:
            self._lazy_flush.cancel()
            self._lazy_flush = None

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled and self._loop is not None:
            self._cancel_lazy_flush()          # this flush takes the lazy calls along
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _drop(self, protocol: _Connection | None, error: Exception) -> None:
        """Fail every outstanding call with `error` and close the connection; the next flush opens another."""
        if protocol is None or protocol is not self._protocol:
            return   # already dropped
        self._protocol = None
        outstanding = protocol.close()
        self._loading.clear()
        if isinstance(error, RedisConnectionError) and not self._closed:
            # The pool's idle connections went to the same server and are most likely dead too, and
            # redis-py 8 no longer spots that at checkout: close them, so its next command reconnects.
            self._in_background(_quietly(lambda: self._pool.disconnect(inuse_connections=False)))
        self._fail(outstanding, error)
        if self._queue:
            self._schedule_flush()

    def _fail(self, calls: Sequence[_Call], error: Exception) -> None:
        """Fail every call still waiting with `error`, as its caller sees it."""
        wrapped = self._wrap_error(error)
        for call in calls:
            if call.future is not None and not call.future.done():
                call.future.set_exception(wrapped)
                if call.operation is not None and self.observe is not None and self._loop is not None:
                    self.observe(call.operation, self._loop.time() - call.started, True)

    def _in_background(self, work: Any) -> asyncio.Task[None]:
        """Run `work` without waiting for it (aclose does wait)."""
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task


class _Connection(asyncio.Protocol):
    """One taken-over connection: the calls written on it, answered in order by what Redis sends (parsed by
    hiredis), and its watchdog, armed while calls are outstanding."""

    def __init__(self, pipeline: ScriptPipeline, writer: asyncio.StreamWriter, loop: asyncio.AbstractEventLoop,
                 timeout_s: float | None) -> None:
        self._pipeline = pipeline
        self._writer = writer                # kept alive with its transport (see _take_writer)
        self.transport: asyncio.Transport = writer.transport  # type: ignore[assignment]
        self._reader = hiredis.Reader(protocolError=InvalidResponse, replyError=_reply_error)
        self._loop = loop
        self._timeout = timeout_s
        self.pending: deque[_Call] = deque()     # written, in order, waiting for their replies
        self._watchdog: asyncio.TimerHandle | None = None

    def write(self, calls: list[_Call], now: float) -> None:
        """Send the calls not given up meanwhile, in one write; they become outstanding."""
        packets = []
        for call in calls:
            if call.future is None or not call.future.done():
                call.sent_at = now
                if call.lazy:
                    call.started = now
                packets.append(call.packed)
                self.pending.append(call)
        if not packets:
            return
        if self._watchdog is None and self._timeout is not None:
            self._watchdog = self._loop.call_at(now + self._timeout, self._check_oldest)
        self._pipeline._send(self, packets[0] if len(packets) == 1 else b"".join(packets))

    def close(self) -> list[_Call]:
        """Stop the watchdog and close the transport; the calls that were still waiting for their replies."""
        outstanding = list(self.pending)
        self.pending.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self.transport.close()
        return outstanding

    def data_received(self, data: bytes) -> None:
        reader, answer = self._reader, self._answer
        reader.feed(data)
        while True:
            try:
                reply = reader.gets()
            except InvalidResponse as error:
                self._pipeline._drop(self, error)
                return
            if reply is False:
                return
            answer(reply)

    def eof_received(self) -> bool:
        return False   # Redis closed its side: close ours too (connection_lost follows)

    def connection_lost(self, exc: Exception | None) -> None:
        reason = f": {exc}" if exc else ""
        self._pipeline._drop(self, RedisConnectionError(f"Connection to Redis lost{reason}"))

    def _answer(self, reply: Any) -> None:
        """Settle the oldest outstanding call with `reply`."""
        pipeline = self._pipeline
        if self is not pipeline._protocol:
            return
        if not self.pending:
            pipeline._drop(self, InvalidResponse("Redis sent a reply no call was waiting for"))
            return
        call = self.pending.popleft()
        future = call.future
        if future is None:   # our SCRIPT LOAD: the calls sent again behind it are under way
            pipeline._loading.discard(call.script)
            return
        failed = isinstance(reply, ResponseError)
        if future.done():   # its caller gave up
            pass
        elif not failed:
            _resolve(future, reply, call.parse)
        elif isinstance(reply, NoScriptError) and not call.retried:
            pipeline._send_again(call)
            return
        else:
            future.set_exception(pipeline._wrap_error(reply))
        if call.operation is not None and pipeline.observe is not None:
            pipeline.observe(call.operation, self._loop.time() - call.started, failed)

    def _check_oldest(self) -> None:
        """The watchdog: drop the connection once the oldest outstanding call has waited timeout_s."""
        self._watchdog = None
        if not self.pending or self._timeout is None:
            return
        oldest = self.pending[0]
        deadline = oldest.sent_at + self._timeout
        if self._loop.time() < deadline - TIMER_SLACK_S:
            self._watchdog = self._loop.call_at(deadline, self._check_oldest)
            return
        # Its reply may have arrived in this very loop turn, still to be read: look once more on the next.
        self._watchdog = self._loop.call_at(self._loop.time(), self._time_out, oldest)

    def _time_out(self, oldest: _Call) -> None:
        """Drop the connection if `oldest` is still waiting one loop turn after its deadline."""
        self._watchdog = None
        if self.pending and self.pending[0] is oldest:
            self._pipeline._drop(self, RedisTimeoutError(f"Redis did not answer within {self._timeout:g} s"))
        elif self.pending:
            self._check_oldest()


async def take_over(connection: AbstractConnection) -> asyncio.StreamWriter:
    """`connection` opened and its stream writer taken from redis-py (see _take_writer); a connection that
    fails on the way (or whose opening is cancelled) is dropped."""
    try:
        await connection.connect()
        return _take_writer(connection)
    except BaseException:
        await _quietly(lambda: connection.disconnect(nowait=True))
        raise


def _take_writer(connection: AbstractConnection) -> asyncio.StreamWriter:
    """The opened connection's stream writer (and so its transport), taken from redis-py.

    redis-py keeps the connection's stream reader and writer in `_reader` and `_writer` (since 4.2);
    clearing them leaves it nothing to read, write or close, and nothing to warn about. The writer must
    stay referenced while its transport is used: asyncio closes the transport when it is collected.
    """
    writer = connection._writer           # AttributeError where a release keeps it elsewhere
    if not isinstance(writer, asyncio.StreamWriter):
        raise RuntimeError("this redis-py connection has no asyncio transport to pipeline on")
    connection._reader = connection._writer = None
    return writer


def _reply_error(message: str) -> ResponseError:
    """An error reply as redis-py names it (NOSCRIPT is the one the pipeline handles itself)."""
    return NoScriptError(message) if message.startswith("NOSCRIPT") else ResponseError(message)


def _resolve(future: asyncio.Future[Any], reply: Any, parse: Parse | None) -> None:
    """Answer `future` with the reply, parsed; a parser's exception is the call's."""
    if parse is None:
        future.set_result(reply)
        return
    try:
        future.set_result(parse(reply))
    except Exception as error:
        future.set_exception(error)


async def _quietly(closing: Callable[[], Any]) -> None:
    """Await `closing()`; whatever it raises (even for not fitting this redis-py) is ignored."""
    with contextlib.suppress(Exception):   # what it closes is gone either way
        await closing()


def _resp(words: Sequence[str], utf8: bool, encoding: str, errors: str) -> bytes:
    """One command in the Redis protocol: hiredis' C packer for UTF-8 (what a text can't be encoded in
    strictly is packed word by word under the client's error handler)."""
    if utf8:
        try:
            return hiredis.pack_command(tuple(words))  # type: ignore[arg-type]  # its stub says a 1-tuple
        except UnicodeEncodeError:
            pass
    parts = [b"*%d\r\n" % len(words)]
    for word in words:
        data = word.encode(encoding, errors)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"
