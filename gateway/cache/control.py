"""The client's say over the cache: `Cache-Control: no-cache` skips the lookup (and refreshes the entry),
`no-store` neither reads nor writes."""

from __future__ import annotations

from typing import NamedTuple

__all__ = ["Control", "DEFAULT", "control_of"]


class Control(NamedTuple):
    """Whether a request may be answered from the cache, and whether its answer may be kept."""

    read: bool
    write: bool


DEFAULT = Control(True, True)
_NO_STORE = Control(False, False)
_NO_CACHE = Control(False, True)


def control_of(header: str | None) -> Control:
    """The Control a Cache-Control header value asks for (directives are case-insensitive; values ignored)."""
    if not header:
        return DEFAULT
    directives = {part.partition("=")[0].strip().lower() for part in header.split(",")}
    if "no-store" in directives:
        return _NO_STORE
    if "no-cache" in directives:
        return _NO_CACHE
    return DEFAULT
