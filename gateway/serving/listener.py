"""The listening sockets, bound before anything else starts, and an accept loop that outlives resource limits.

uvloop's own server closes its listening socket for good on an accept error it cannot absorb (ENFILE,
ENOMEM, an EMFILE when its reserve descriptor is gone): the gateway would stop serving for the life of the
process. So the gateway accepts itself, through `loop.sock_accept` and `loop.connect_accepted_socket`
(public asyncio API, uvloop's too): an accept that fails is logged and counted by `keep_running`, which
tries again a moment later, and connections wait in the kernel's backlog meanwhile. Accepting also waits
while the connection table is full, so the process never takes more connections than it has room for.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Callable
from typing import Any

from gateway.serving.connections import ClientConnections

__all__ = ["BACKLOG", "bind", "bind_or_explain", "Acceptor"]

BACKLOG = 1024   # connections the kernel queues while the gateway is at its cap or busy (capped by somaxconn)


def bind(host: str, port: int, *, reuse_port: bool = False) -> list[socket.socket]:
    """Listening sockets on every address of `host`; raises OSError (address in use, ...) before any is kept."""
    addresses: list[tuple[socket.AddressFamily, socket.SocketKind, int, Any]] = []
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE):
        if (family, address) not in [(f, a) for f, _, _, a in addresses]:
            addresses.append((family, kind, proto, address))
    sockets: list[socket.socket] = []
    try:
        for entry in addresses:
            sockets.append(_listen(*entry, reuse_port))
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def bind_or_explain(host: str, port: int, *, reuse_port: bool = False) -> list[socket.socket] | None:
    """`bind`, or None after one line on stderr saying why the address cannot be used."""
    try:
        return bind(host, port, reuse_port=reuse_port)
    except OSError as exc:
        print(f"gateway: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return None


def _listen(family: int, kind: int, proto: int, address: tuple, reuse_port: bool) -> socket.socket:
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class Acceptor:
    """Accepts connections on one listening socket while `connections` has room (one per `step`)."""

    def __init__(self, sock: socket.socket, protocol: Callable[[], asyncio.Protocol],
                 connections: ClientConnections) -> None:
        self.sock = sock
        self._protocol = protocol
        self._connections = connections

    async def step(self) -> None:
        """Accept one connection and hand it to a new protocol once the table has room for it; errors go to
        the caller (keep_running). Room is made for a connection that is there, never in advance."""
        loop = asyncio.get_running_loop()
        try:
            conn = await self._accept(loop)
        except ConnectionAbortedError:               # the client gave up before we took it
            return
        try:
            await self._connections.room()
            conn.setblocking(False)
            await loop.connect_accepted_socket(self._protocol, conn)
        except BaseException:
            conn.close()
            raise

    async def _accept(self, loop: asyncio.AbstractEventLoop) -> socket.socket:
        try:
            return self.sock.accept()[0]             # one is often waiting already: no reader to register
        except BlockingIOError:
            return (await loop.sock_accept(self.sock))[0]
