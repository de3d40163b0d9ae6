"""How many client connections the process can hold: its open-file limit, less what the rest needs."""

from __future__ import annotations

import resource

from gateway.config.model import Settings

__all__ = ["FIXED_RESERVE", "raise_open_file_limit", "reserved_files", "connection_cap"]

FIXED_RESERVE = 64        # files that are not client connections: listening sockets, SQLite, journal, logs, epoll
UNLIMITED_TARGET = 1 << 20


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as Go and nginx do); the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return UNLIMITED_TARGET if soft == resource.RLIM_INFINITY else soft


def reserved_files(settings: Settings) -> int:
    """Descriptors kept for everything but client connections: upstream pools, the store pool, the rest."""
    upstream = sum(provider.max_connections for provider in settings.providers.values())
    return upstream + settings.store.pool_size + FIXED_RESERVE


def connection_cap(settings: Settings, open_files: int) -> int:
    """`server.max_connections`, lowered to what `open_files` leaves for clients (at least 1)."""
    return max(1, min(settings.server.max_connections, open_files - reserved_files(settings)))
