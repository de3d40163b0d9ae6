"""Shared fixtures; the whole suite is checked for provider-key leaks in logs at the end."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

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
