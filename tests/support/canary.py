"""The canary provider key: every gateway the tests build uses it, and nothing may ever show it."""

from __future__ import annotations

import logging

import httpx2 as httpx

__all__ = ["CANARY_KEY", "CanaryLogHandler", "CanaryTransport", "assert_no_canary"]

CANARY_KEY = "sk-CANARY-3f9a1c7e5b2d4a6f8e0c1b3d5f7a9c2e"


def assert_no_canary(data: bytes | str, where: str) -> None:
    """Fail the test when `data` contains the canary key or a large piece of it."""
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    assert CANARY_KEY not in text and CANARY_KEY[10:30] not in text, f"provider key leaked in {where}"


class CanaryLogHandler(logging.Handler):
    """Collects every log line of the test session for the final leak check."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.leaks: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = self.format(record)
        if CANARY_KEY[10:30] in line:
            self.leaks.append(line)


class _ScanningStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, url: str) -> None:
        self._inner, self._url, self._tail = inner, url, b""

    async def __aiter__(self):
        async for chunk in self._inner:
            assert_no_canary(self._tail + chunk, f"response body of {self._url}")
            self._tail = chunk[-64:]
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class CanaryTransport(httpx.AsyncBaseTransport):
    """An httpx transport for the openai SDK that checks every response header and body chunk."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        for name, value in response.headers.items():
            assert_no_canary(f"{name}: {value}", f"response headers of {request.url}")
        response.stream = _ScanningStream(response.stream, str(request.url))
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()
