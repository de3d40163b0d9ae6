"""Scrubbing provider secrets from anything that goes back to a client or a log."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["REDACTED", "Redactor"]

REDACTED = b"[redacted]"


class Redactor:
    """Replaces every known secret in bytes or text; secrets shorter than 8 characters are ignored."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = tuple(sorted({s.encode() for s in secrets if len(s) >= 8}, key=len, reverse=True))

    def bytes(self, data: bytes) -> bytes:
        """`data` with each secret replaced by [redacted]."""
        for secret in self._secrets:
            if secret in data:
                data = data.replace(secret, REDACTED)
        return data

    def text(self, data: str) -> str:
        """`data` with each secret replaced by [redacted]."""
        return self.bytes(data.encode()).decode(errors="replace") if self._secrets else data
