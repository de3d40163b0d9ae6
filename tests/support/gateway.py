"""Fixtures that run the real gateway app and the mock upstream on loopback, in the test's loop."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import httpx2 as httpx
import openai
import pytest
from aiohttp import web
from multidict import CIMultiDict
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config.model import Settings, StoreConfig
from gateway.mock_upstream import MockUpstream
from gateway.serving.listener import bind
from gateway.serving.server import GatewayServer
from tests.support.canary import CanaryTransport, assert_no_canary
from tests.support.settings import CLIENT_KEY

__all__ = ["RunningGateway", "Reply", "ServedGateway", "upstream", "backup_upstream", "start_gateway", "serve_gateway",
           "sdk", "anthropic_sdk", "http"]


@dataclass
class RunningGateway:
    """A gateway app served on a loopback port."""

    app: web.Application
    server: TestServer

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")


@dataclass
class Reply:
    """A raw HTTP answer from the gateway."""

    status: int
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        import orjson
        return orjson.loads(self.body)


async def _serve(app: web.Application) -> TestServer:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


async def _mock(name: str) -> AsyncIterator[MockUpstream]:
    mock = MockUpstream(name=name)
    server = await _serve(mock.app())
    mock.url = str(server.make_url("/v1"))  # type: ignore[attr-defined]
    yield mock
    await server.close()


@pytest.fixture
async def upstream() -> AsyncIterator[MockUpstream]:
    """The primary mock provider; `upstream.url` is its /v1 base URL."""
    async for mock in _mock("primary"):
        yield mock


@pytest.fixture
async def backup_upstream() -> AsyncIterator[MockUpstream]:
    """A second mock provider, for failover."""
    async for mock in _mock("backup"):
        yield mock


def in_tmp(settings: Settings, tmp_path: Path) -> Settings:
    """Settings whose default embedded store and journal live in the test's own directory."""
    defaults = StoreConfig()
    store = settings.store
    if store.path == defaults.path:
        store = dataclasses.replace(store, path=str(tmp_path / "gateway.db"))
    if store.journal_path == defaults.journal_path:
        store = dataclasses.replace(store, journal_path=str(tmp_path / "journal.jsonl"))
    return dataclasses.replace(settings, store=store)


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[RunningGateway]]]:
    """Start the real gateway app with the given Settings and create_app keyword arguments."""
    running: list[TestServer] = []

    async def start(settings: Settings, **kwargs: Any) -> RunningGateway:
        app = create_app(in_tmp(settings, tmp_path), **kwargs)
        server = await _serve(app)
        running.append(server)
        return RunningGateway(app, server)

    yield start
    for server in reversed(running):
        await server.close()


@pytest.fixture
async def sdk() -> AsyncIterator[Callable[..., openai.AsyncOpenAI]]:
    """The official openai SDK pointed at a gateway; every answer is scanned for the canary key."""
    clients: list[openai.AsyncOpenAI] = []

    def make(gateway: RunningGateway, key: str = CLIENT_KEY, **kwargs: Any) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(
            base_url=gateway.url + "/v1", api_key=key, max_retries=kwargs.pop("max_retries", 0),
            http_client=httpx.AsyncClient(transport=CanaryTransport(), timeout=30), **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def anthropic_sdk() -> AsyncIterator[Callable[..., anthropic.AsyncAnthropic]]:
    """The official anthropic SDK pointed at a gateway; every answer is scanned for the canary key."""
    clients: list[anthropic.AsyncAnthropic] = []

    def make(gateway: RunningGateway, key: str = CLIENT_KEY, **kwargs: Any) -> anthropic.AsyncAnthropic:
        client = anthropic.AsyncAnthropic(
            base_url=gateway.url, api_key=key, max_retries=kwargs.pop("max_retries", 0),
            http_client=httpx.AsyncClient(transport=CanaryTransport(), timeout=30), **kwargs)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


@pytest.fixture
async def http() -> AsyncIterator[Callable[..., Awaitable[Reply]]]:
    """Raw HTTP to a gateway; every answer is scanned for the canary key."""
    session = aiohttp.ClientSession()

    async def call(gateway: RunningGateway, method: str, path: str, *, key: str | None = CLIENT_KEY,
                   headers: dict[str, str] | None = None, **kwargs: Any) -> Reply:
        all_headers = {"Authorization": f"Bearer {key}"} if key else {}
        all_headers.update(headers or {})
        async with session.request(method, gateway.url + path, headers=all_headers, **kwargs) as resp:
            body = await resp.read()
        reply = Reply(resp.status, CIMultiDict(resp.headers), body)
        assert_no_canary(body, f"{method} {path} body")
        assert_no_canary(repr(reply.headers), f"{method} {path} headers")
        return reply

    yield call
    await session.close()


@dataclass
class ServedGateway:
    """A gateway app served by gateway.serving (own accept loop, connection cap, header deadline)."""

    app: web.Application
    server: GatewayServer

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"


@pytest.fixture
async def serve_gateway(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[ServedGateway]]]:
    """Serve the real gateway app as `gateway run` does, in the test's loop, on a free loopback port."""
    running: list[GatewayServer] = []

    async def start(settings: Settings, *, max_connections: int | None = None, **kwargs: Any) -> ServedGateway:
        app = create_app(in_tmp(settings, tmp_path), **kwargs)
        server = GatewayServer(app, bind("127.0.0.1", 0), settings.server,
                               max_connections or settings.server.max_connections)
        await server.start()
        running.append(server)
        return ServedGateway(app, server)

    yield start
    for server in reversed(running):
        await server.stop(0)
