"""The one form in which client keys are kept: their SHA-256 digest."""

from __future__ import annotations

import hashlib

__all__ = ["key_digest"]


def key_digest(key: str) -> str:
    """Hex SHA-256 of a client key: the only form in which keys are kept."""
    return hashlib.sha256(key.encode()).hexdigest()
