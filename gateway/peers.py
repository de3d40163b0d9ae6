"""Sibling workers of one `gateway run --workers N`: whichever worker answers, it answers for all of them.

Each worker keeps its own metrics and circuit breakers. So that `/metrics` and `/v1/providers/status` tell
the truth whichever worker the kernel hands a request to, every worker also serves its own state on a
private unix socket, `<peer dir>/w<index>.sock`, in a directory the supervisor makes for the run (mode
0700: only the gateway's user can connect). The worker that answers asks its siblings there, all at once,
and merges. A sibling that does not answer within PEER_TIMEOUT_S fails the whole answer
(`WorkerUnavailable`, 503): a scrape that left one worker out would show its counters going backwards.
Nothing here runs on the request path.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway.errors import WorkerUnavailable

__all__ = ["Peers", "PEER_TIMEOUT_S"]

log = logging.getLogger("gateway")
PEER_TIMEOUT_S = 2.0
Produce = Callable[[], Any]   # what a worker tells its siblings: JSON-able, or an awaitable of it


class Peers:
    """This worker's place among its siblings: its index, their count, and the directory of their sockets."""

    def __init__(self, directory: str, index: int, count: int, *, timeout_s: float = PEER_TIMEOUT_S) -> None:
        self.directory, self.index, self.count = Path(directory), index, count
        self._timeout_s = timeout_s
        self._provided: dict[str, Produce] = {}
        self._sessions: dict[int, aiohttp.ClientSession] = {}

    def socket_path(self, index: int) -> Path:
        """Where worker `index` answers its siblings."""
        return self.directory / f"w{index}.sock"

    def provide(self, name: str, produce: Produce) -> None:
        """Answer the siblings' `name` questions with `produce()`."""
        self._provided[name] = produce

    async def siblings(self, name: str) -> list[Any]:
        """`name` of every other worker, in index order; WorkerUnavailable when one does not answer in time."""
        others = [index for index in range(self.count) if index != self.index]
        try:
            async with asyncio.timeout(self._timeout_s):
                return await asyncio.gather(*(self._ask(index, name) for index in others))
        except (OSError, aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            log.warning("a sibling worker did not answer '%s': %s", name, type(exc).__name__)
            raise WorkerUnavailable(f"A gateway worker did not answer in time; without its {name} the answer "
                                    "would be wrong, so none is given. Try again.", headers={"Retry-After": "1"}) from exc

    async def everyone(self, name: str, own: Any) -> list[Any]:
        """`name` of every worker in index order, `own` for this one (see `siblings`)."""
        answers = await self.siblings(name)
        answers.insert(self.index, own)
        return answers

    async def _ask(self, index: int, name: str) -> Any:
        session = self._sessions.get(index)
        if session is None:
            session = self._sessions[index] = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=str(self.socket_path(index))))
        async with session.get(f"http://worker/{name}") as reply:
            reply.raise_for_status()
            return orjson.loads(await reply.read())

    async def _answer(self, request: web.Request) -> web.Response:
        produce = self._provided.get(request.match_info["name"])
        if produce is None:
            raise web.HTTPNotFound()
        result = produce()
        if inspect.isawaitable(result):
            result = await result
        return web.Response(body=orjson.dumps(result), content_type="application/json")

    async def link(self, _app: web.Application) -> AsyncIterator[None]:
        """A cleanup context: serve this worker's socket for the app's lifetime, then close every link."""
        server = web.Application()
        server.router.add_get("/{name}", self._answer)
        runner = web.AppRunner(server, access_log=None)
        await runner.setup()
        await web.UnixSite(runner, str(self.socket_path(self.index))).start()
        yield
        for session in self._sessions.values():
            await session.close()
        await runner.cleanup()
