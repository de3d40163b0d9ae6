"""Running the app on bound sockets: start, serve, and stop within a defined time.

Stopping (SIGTERM or SIGINT; a second signal ends the grace period at once):

1. the listening sockets close, and every connection that is not serving a request is closed;
2. requests in flight get up to `server.shutdown_grace_s` to finish; their connections close after them;
3. then the streams still open are cut: each ends with the SSE error event of a stream its upstream cut
   off (`stream_truncated`) and is charged for what it delivered, like one (gateway.upstream.open_streams);
4. what still runs CUT_WAIT_S + CANCEL_WAIT_S after that is cancelled; its reservation is still settled
   or released (gateway.upstream.charging);
5. the app's cleanup waits for the settlements (to the store, or the spend journal when the store fails)
   and closes the store.

`gateway run` exits within grace + EXIT_MARGIN_S; if something hangs past that it exits anyway, status 1.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import threading

from aiohttp import web

from gateway.background import keep_running
from gateway.config.loader import startup_line
from gateway.config.model import ServerConfig, Settings
from gateway.http.appkeys import BACKGROUND, OPEN_STREAMS, WIRE_HITS
from gateway.serving.connections import ClientConnections, GatewayRequestHandler
from gateway.serving.listener import Acceptor

__all__ = ["GatewayServer", "run", "CUT_WAIT_S", "CANCEL_WAIT_S", "EXIT_MARGIN_S"]

log = logging.getLogger("gateway")

CUT_WAIT_S = 0.75          # after the upstream calls are cut: for relays to send their last event and settle
CANCEL_WAIT_S = 0.25       # aiohttp's shutdown, per handler: wait this, cancel it, wait this again
EXIT_MARGIN_S = 2.0        # the process is gone by grace + this
SWEEPS_PER_DEADLINE = 4    # header deadline sweeps per header_timeout_s (at most one a second)


class GatewayServer:
    """The app served on bound listening sockets, with a cap on client connections and a header deadline."""

    def __init__(self, app: web.Application, sockets: list[socket.socket], config: ServerConfig,
                 max_connections: int) -> None:
        self.app = app
        self.sockets = sockets
        self.config = config
        self.connections = ClientConnections(max_connections, config.header_timeout_s)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=CANCEL_WAIT_S)
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def port(self) -> int:
        """The port of the first listening socket (the one asked for, or the one given for port 0)."""
        return int(self.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Start the app (its startup and cleanup contexts), then accept connections."""
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        protocol = functools.partial(GatewayRequestHandler, server, self.connections, self.app.get(WIRE_HITS),
                                     loop=asyncio.get_running_loop(),
                                     keepalive_timeout=self.config.keepalive_timeout_s, access_log=None)
        failures = self.app[BACKGROUND]
        self._tasks = [asyncio.create_task(keep_running("accept_connections", Acceptor(sock, protocol,
                                                        self.connections).step, failures))
                       for sock in self.sockets]
        self._tasks.append(asyncio.create_task(keep_running("header_deadlines", self._sweep, failures)))

    async def _sweep(self) -> None:
        await asyncio.sleep(min(1.0, self.config.header_timeout_s / SWEEPS_PER_DEADLINE))
        self.connections.close_overdue(asyncio.get_running_loop().time())

    async def stop(self, grace_s: float, hurry: asyncio.Event | None = None) -> None:
        """Stop as the module doc says; `hurry` set ends the grace period early."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock in self.sockets:
            sock.close()
        self.connections.close_waiting()
        if self._runner.server is not None:
            self._runner.server.pre_shutdown()      # kept-alive connections close after their request
        if not await self.connections.drained(grace_s, hurry):
            cut = self.app[OPEN_STREAMS].cut_all()
            log.warning("%d client connections still busy after the %.3g s shutdown grace: %d streams cut, "
                        "the other requests are cancelled in %.3g s", len(self.connections), grace_s, cut, CUT_WAIT_S)
            await self.connections.drained(CUT_WAIT_S)
        await self._runner.cleanup()


class _StopSignals:
    """SIGTERM and SIGINT: the first one stops the server, a second one hurries it."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._received)

    def _received(self) -> None:
        (self.hurry if self.stop.is_set() else self.stop).set()


def run(app: web.Application, settings: Settings, sockets: list[socket.socket], max_connections: int) -> int:
    """Serve `app` on `sockets` until SIGTERM or SIGINT, then stop; the process's exit status."""
    return asyncio.run(_serve(app, settings, sockets, max_connections))


async def _serve(app: web.Application, settings: Settings, sockets: list[socket.socket], max_connections: int) -> int:
    server = GatewayServer(app, sockets, settings.server, max_connections)
    signals = _StopSignals()
    await server.start()
    log.info("gateway listening on http://%s:%d %s", settings.server.host, server.port, startup_line(settings))
    await signals.stop.wait()
    grace_s = settings.server.shutdown_grace_s
    log.info("gateway stopping: requests in flight have %.3g s to finish", grace_s)
    _exit_if_still_running_after(grace_s + EXIT_MARGIN_S)
    await server.stop(grace_s, signals.hurry)
    return 0


def _exit_if_still_running_after(seconds: float) -> None:
    """The last resort of a stop: whatever hangs (a driver, a thread), the process ends by then."""

    def exit_now() -> None:
        os.write(2, f"gateway: still stopping {seconds:.3g} s after the stop signal; exiting now\n".encode())
        os._exit(1)

    timer = threading.Timer(seconds, exit_now)
    timer.daemon = True
    timer.start()
