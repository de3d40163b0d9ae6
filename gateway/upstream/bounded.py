"""Reading a whole upstream body within a byte limit, so memory stays flat whatever an upstream sends."""

from __future__ import annotations

import aiohttp

__all__ = ["BodyTooLarge", "read_bounded"]


class BodyTooLarge(Exception):
    """The upstream body is larger than the limit."""


async def read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, read as it arrives; BodyTooLarge once it passes `limit` bytes (decoded).

    A Content-Length past the limit is refused before a byte is read. On any failure (too large, cut
    short, timed out, cancelled) the connection is closed rather than pooled half-read, and the error
    propagates: aiohttp raises ClientPayloadError for a body shorter than its Content-Length.
    """
    chunks: list[bytes] = []
    try:
        length = response.content_length
        if length is not None and length > limit:
            raise BodyTooLarge(f"Content-Length {length} is over the {limit}-byte limit")
        size, content = 0, response.content
        while chunk := await content.readany():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"the body is over the {limit}-byte limit")
            chunks.append(chunk)
    except BaseException:
        response.close()
        raise
    return b"".join(chunks)
