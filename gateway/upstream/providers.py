"""One pooled aiohttp ClientSession per provider, kept for the app's lifetime and rebuilt on reload.

A reload retires the clients of changed and removed providers instead of closing them: requests
planned on the old config still find a removed provider by name, and a retiring session is closed
only once no request can still use it, `timeouts.total_s` + 5 s after its last use (aiohttp's total
timeout bounds a call, body included). Its secrets stay redacted until then.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Mapping

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway.config.model import ProviderConfig
from gateway.redact import Redactor

__all__ = ["ProviderClient", "ProviderPool", "RETIRE_MARGIN_S"]

RETIRE_MARGIN_S = 5.0
ANTHROPIC_VERSION = "2023-06-01"   # sent on Messages calls unless the provider's `headers` name another


def _auth(config: ProviderConfig, api: str) -> dict[str, str]:
    """The key, sent as the API expects it: Anthropic's `x-api-key` (and `anthropic-version`), else a bearer."""
    if api == "anthropic-messages":
        configured = {name.lower(): value for name, value in config.headers}
        return {"x-api-key": config.api_key,
                "anthropic-version": configured.get("anthropic-version", ANTHROPIC_VERSION)}
    return {"Authorization": f"Bearer {config.api_key}"}


def _call_headers(config: ProviderConfig, auth: dict[str, str]) -> CIMultiDict[str]:
    """The headers of every call, merged as aiohttp merges per-call headers, once instead of per call."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in {**dict(config.headers), "Content-Type": "application/json", **auth}.items():
        headers[name] = value
    return headers


def _styles(config: ProviderConfig) -> tuple[CIMultiDict[str] | None, dict[str, CIMultiDict[str]]]:
    """The session's headers and, for a provider whose APIs differ in auth style, each API's own per call.

    A provider of one style has its headers on the session (a call passes none, so aiohttp merges none); one
    serving both styles has none on the session, and each call passes its API's whole set, so no call carries
    the key twice or in the other API's header.
    """
    styles = {api: _auth(config, api) for api in config.apis}
    first = styles[config.apis[0]]
    if all(auth == first for auth in styles.values()):
        return _call_headers(config, first), {}
    return None, {api: _call_headers(config, auth) for api, auth in styles.items()}


class ProviderClient:
    """Talks to one OpenAI-compatible provider; the provider key is added here and only here."""

    def __init__(self, config: ProviderConfig) -> None:
        self.config = config
        timeouts = config.timeouts
        session_headers, self._headers = _styles(config)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=config.max_connections, ttl_dns_cache=300),
            timeout=aiohttp.ClientTimeout(
                total=timeouts.total_s, connect=timeouts.connect_s, sock_read=timeouts.read_s),
            raise_for_status=False,
            headers=session_headers,
            # No cookie jar: a provider's cookies must not ride along on other clients' calls (nor cost a
            # jar lookup on every call).
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._urls: dict[str, URL] = {}
        self.last_used = 0.0                 # time.monotonic() of the last post()
        # The longest aiohttp lets a call wait for the response head: connecting (or a free connection),
        # then at most read_s until the first bytes, and never more than total_s.
        self.head_timeout_s = min(timeouts.total_s, timeouts.connect_s + timeouts.read_s)

    @property
    def secrets(self) -> tuple[str, ...]:
        """What must never reach a client: the API key and every configured header value."""
        return (self.config.api_key, *(value for _, value in self.config.headers))

    def url(self, path: str) -> URL:
        """The provider URL of an endpoint path, parsed once."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.config.base_url.rstrip("/") + path)
        return url

    def post(self, path: str, body: bytes, api: str = "openai-chat") -> Awaitable[aiohttp.ClientResponse]:
        """POST `body` to the provider (await it), authenticated as `api` expects; the caller must release the
        response.

        A redirect is returned, never followed: aiohttp would send the body and the configured headers
        (all but Authorization) to whatever host it names.
        """
        self.last_used = time.monotonic()   # (asyncio.get_running_loop costs a getpid call on 3.11)
        if self._headers:
            return self.session.post(self.url(path), data=body, headers=self._headers[api], allow_redirects=False)
        return self.session.post(self.url(path), data=body, allow_redirects=False)

    async def close(self) -> None:
        """Close the session and its connections."""
        await self.session.close()


class ProviderPool:
    """The live ProviderClients by name; `sync` follows config reloads without dropping requests."""

    def __init__(self, providers: Mapping[str, ProviderConfig]) -> None:
        self._clients: dict[str, ProviderClient] = {}
        self._retiring: dict[ProviderClient, asyncio.Task[None]] = {}
        self.redactor = Redactor(())
        self.sync(providers)

    def __getitem__(self, name: str) -> ProviderClient:
        """The live client of `name`, else a retiring one (a request planned before a reload)."""
        client = self._clients.get(name)
        if client is not None:
            return client
        for retiring in reversed(self._retiring):
            if retiring.config.name == name:
                return retiring
        raise KeyError(name)

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
        self._redact_known()

    def _redact_known(self) -> None:
        """Redact the secrets of every client a request may still use, retiring ones included."""
        clients = [*self._clients.values(), *self._retiring]
        self.redactor = Redactor(secret for client in clients for secret in client.secrets)

    def _retire(self, client: ProviderClient) -> None:
        """Close `client` once its total timeout (plus a margin) has passed since its retirement or last use."""
        grace_s = client.config.timeouts.total_s + RETIRE_MARGIN_S
        retired_at = time.monotonic()

        async def close_later() -> None:
            while (wait := max(retired_at, client.last_used) + grace_s - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            del self._retiring[client]
            self._redact_known()
            await client.close()

        self._retiring[client] = asyncio.get_running_loop().create_task(close_later())

    async def close(self) -> None:
        """Close every session, retiring ones included."""
        for task in self._retiring.values():
            task.cancel()
        clients = [*self._clients.values(), *self._retiring]
        self._retiring.clear()
        await asyncio.gather(*(c.close() for c in clients))
