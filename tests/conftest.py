"""Shared fixtures; the whole suite is checked for provider-key leaks in logs at the end."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from gateway.config.model import StoreConfig
from tests.support.canary import CanaryLogHandler

pytest_plugins = ["tests.support.gateway", "tests.support.redis_server"]


@pytest.fixture(scope="session", autouse=True)
def canary_log_guard() -> Iterator[CanaryLogHandler]:
    """Every log line of the session, at every level, must be free of the canary provider key."""
    handler = CanaryLogHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(previous)
    assert not handler.leaks, f"provider key leaked into logs: {handler.leaks[:3]}"


@pytest.fixture(params=["embedded", "redis"])
def store_config(request, tmp_path) -> StoreConfig:
    """The embedded store and a real redis-server, spare reservations off (tests/test_spare_reservations.py
    covers them); a module needing other stores or options defines its own."""
    if request.param == "redis":
        return StoreConfig(url=request.getfixturevalue("redis_url"), reserve_ahead=False)
    return StoreConfig(path=str(tmp_path / "budget.db"), reserve_ahead=False)
