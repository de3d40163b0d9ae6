"""Keys never reach a log: malformed requests that aiohttp refuses, bearer tokens, provider secrets."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest

from gateway.http.appkeys import PROVIDERS
from tests.support.canary import CANARY_KEY
from tests.support.settings import CLIENT_KEY, make_settings

HEADER_SECRET = "hdr-SECRET-0123456789"
HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
AUTH = f"Authorization: Bearer {CLIENT_KEY}".encode()
TAIL = b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
MALFORMED = {
    "NUL in the value": HEAD + AUTH + b"\x00x\r\n" + TAIL,
    "lone CR in the value": HEAD + AUTH + b"\rx\r\n" + TAIL,
    "DEL in the value": HEAD + AUTH + b"\x7f\r\n" + TAIL,
    "obs-fold": HEAD + b"Authorization: Bearer\r\n " + CLIENT_KEY.encode() + b"\r\n" + TAIL,
    "space before the colon": HEAD + f"Authorization : Bearer {CLIENT_KEY}".encode() + b"\r\n" + TAIL,
    "NUL in a later header": HEAD + AUTH + b"\r\nX-Trace: a\x00b\r\n" + TAIL,
    "bad request line": b"POST /v1/chat/completions HTTP/1.1\x00\r\n" + AUTH + b"\r\n" + TAIL,
}


async def exchange(url: str, raw: bytes) -> bytes:
    """Send `raw` on a fresh connection and read the answer until the server closes it."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def assert_no_keys(caplog: pytest.LogCaptureFixture) -> None:
    lines = [caplog.text, *(r.getMessage() for r in caplog.records)]
    for line in lines:
        assert CLIENT_KEY not in line and CLIENT_KEY[3:] not in line, line
        assert CANARY_KEY not in line and HEADER_SECRET not in line, line


@pytest.fixture(params=["aiohttp's own server", "gateway.serving"])
async def gateway(request, upstream, start_gateway, serve_gateway):
    """The gateway behind aiohttp's RequestHandler (as in tests), or behind the one `gateway run` uses."""
    settings = make_settings({"primary": upstream.url})
    if request.param == "gateway.serving":
        return await serve_gateway(settings)
    return await start_gateway(settings)


@pytest.mark.parametrize("variant", list(MALFORMED))
async def test_a_malformed_request_logs_no_key_at_any_level(gateway, caplog, variant):
    caplog.set_level(logging.DEBUG)

    answer = await exchange(gateway.url, MALFORMED[variant])

    assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
    assert any(r.levelno >= logging.INFO for r in caplog.records), "aiohttp logged nothing to check"
    assert_no_keys(caplog)


@pytest.mark.parametrize("token", [b"sk-\xff\xfe-not-utf8", "sk-\u00e9t\u00e9-\u4e2d".encode()], ids=["undecodable", "non-latin-1"])
async def test_an_authorization_header_that_is_not_latin_1_is_a_401(gateway, upstream, token):
    raw = HEAD + b"Authorization: Bearer " + token + b"\r\nConnection: close\r\n" + TAIL

    answer = await exchange(gateway.url, raw)

    assert b" 401 " in answer.split(b"\r\n")[0], answer[:200]
    assert b'"code":"invalid_api_key"' in answer and upstream.hits == 0


async def test_a_bearer_token_in_any_message_is_redacted(gateway, caplog):
    caplog.set_level(logging.DEBUG)
    logging.getLogger("somewhere.else").warning("calling with headers %s", {"Authorization": f"Bearer {CLIENT_KEY}"})
    logging.getLogger("somewhere.else").debug("token=Bearer %s; api-key: %s", CLIENT_KEY, "k-123456789")

    assert_no_keys(caplog)
    assert "k-123456789" not in caplog.text and caplog.text.count("[redacted]") == 3


async def test_provider_secrets_are_redacted_in_every_logger_and_follow_a_reload(upstream, start_gateway, caplog):
    caplog.set_level(logging.DEBUG)
    settings = make_settings({"primary": upstream.url})
    gateway = await start_gateway(settings)
    logger = logging.getLogger("aiohttp.client")

    logger.error("upstream said: invalid key %s", CANARY_KEY)
    primary = settings.providers["primary"]
    with_header = dataclasses.replace(primary, headers=(("api-key-2", HEADER_SECRET),))
    gateway.app[PROVIDERS].sync({"primary": with_header})
    logger.error("upstream echoed %s", HEADER_SECRET)
    try:
        raise RuntimeError(f"echo: {HEADER_SECRET}")
    except RuntimeError:
        logger.exception("failed")

    assert_no_keys(caplog)
    assert caplog.text.count("[redacted]") == 3
