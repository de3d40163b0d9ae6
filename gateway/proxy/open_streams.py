"""The upstream streams being relayed right now, so that a shutdown can end them as a broken upstream would."""

from __future__ import annotations

import aiohttp

__all__ = ["OpenStreams"]


class OpenStreams:
    """Upstream responses being relayed to clients as SSE streams.

    `cut_all` closes them: each relay then sees its upstream break off, sends its client the
    `stream_truncated` error event and the request is charged for what it delivered, like any stream its
    upstream cut (see gateway.proxy.charging).
    """

    def __init__(self) -> None:
        self._responses: set[aiohttp.ClientResponse] = set()

    def __len__(self) -> int:
        return len(self._responses)

    def add(self, response: aiohttp.ClientResponse) -> None:
        """A stream starts being relayed."""
        self._responses.add(response)

    def discard(self, response: aiohttp.ClientResponse) -> None:
        """A stream was relayed to its end (or its client left)."""
        self._responses.discard(response)

    def cut_all(self) -> int:
        """Close every upstream stream still being relayed; how many there were."""
        cut = list(self._responses)
        for response in cut:
            response.close()
        return len(cut)
