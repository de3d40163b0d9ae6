"""One pooled aiohttp ClientSession per provider, kept for the app's lifetime and rebuilt on reload."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import aiohttp
from yarl import URL

from gateway.config.model import ProviderConfig
from gateway.redact import Redactor

__all__ = ["ProviderClient", "ProviderPool"]


class ProviderClient:
    """Talks to one OpenAI-compatible provider; the provider key is added here and only here."""

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        timeouts = config.timeouts
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=config.max_connections, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(
                total=timeouts.total_s, connect=timeouts.connect_s, sock_read=timeouts.read_s),
            raise_for_status=False,
        )
        self._headers = {
            **dict(config.headers),
            "Content-Type": "application/json",
            "Authorization": f"Bearer {config.api_key}",
        }
        self._urls: dict[str, URL] = {}

    def url(self, path: str) -> URL:
        """The provider URL of an endpoint path, parsed once."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.config.base_url.rstrip("/") + path)
        return url

    async def post(self, path: str, body: bytes) -> aiohttp.ClientResponse:
        """POST `body` to the provider; the caller must release the response."""
        return await self.session.post(self.url(path), data=body, headers=self._headers)

    async def close(self) -> None:
        await self.session.close()


class ProviderPool:
    """The live ProviderClients by name; `sync` follows config reloads without dropping requests."""

    def __init__(self, providers: Mapping[str, ProviderConfig]) -> None:
        self._clients: dict[str, ProviderClient] = {}
        self._retiring: dict[ProviderClient, asyncio.Task[None]] = {}
        self.redactor = Redactor(())
        self.sync(providers)

    def __getitem__(self, name: str) -> ProviderClient:
        return self._clients[name]

    def sync(self, providers: Mapping[str, ProviderConfig]) -> None:
        """Create clients for new or changed providers; close the others once in-flight calls end."""
        current = self._clients
        fresh = {
            name: current[name] if name in current and current[name].config == config else ProviderClient(config)
            for name, config in providers.items()
        }
        for name, client in current.items():
            if fresh.get(name) is not client:
                self._retire(client)
        self._clients = fresh
        self.redactor = Redactor(c.config.api_key for c in fresh.values())

    def _retire(self, client: ProviderClient, grace_s: float = 30.0) -> None:
        async def close_later() -> None:
            await asyncio.sleep(grace_s)
            await client.close()
            del self._retiring[client]

        self._retiring[client] = asyncio.get_running_loop().create_task(close_later())

    async def close(self) -> None:
        """Close every session, retiring ones included."""
        for task in self._retiring.values():
            task.cancel()
        clients = [*self._clients.values(), *self._retiring]
        self._retiring.clear()
        await asyncio.gather(*(c.close() for c in clients))
