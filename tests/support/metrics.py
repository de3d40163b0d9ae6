"""Metrics test helpers: a config with every label kind, scripted mixed traffic, scraping, promtool."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.clock import FakeClock
from gateway.config.model import BreakerConfig, RetryConfig, Settings
from gateway.mock_upstream import Action, MockUpstream
from gateway.observability.access_log import AccessLog, AccessRecord
from tests.support.gateway import Reply, RunningGateway
from tests.support.settings import make_policy, make_settings

__all__ = [
    "ROUTES", "POLICIES", "metrics_settings", "ClockSleep", "RecordingLog", "mixed_traffic", "scrape",
    "samples", "value", "total", "sample_names", "promtool", "run_promtool",
]

Http = Callable[..., Awaitable[Reply]]
Sample = tuple[str, dict[str, str], float]

ROUTES: dict[str, list[Any]] = {
    "gpt-4.1": ["primary", "backup"],
    "gpt-4o-mini": ["primary"],
    "text-embedding-3-small": ["primary"],
    "gpt-*": [("primary", "gpt-4o-mini")],
}
POLICIES = (
    make_policy("everyone", usd="100"),
    make_policy("web-team", period="monthly", usd="50", teams=("web",)),
    make_policy("embed-cap", requests=1, models=("text-embedding-3-small",)),
)
RETRY = RetryConfig(max_retries=2, backoff_base_s=0.01, backoff_cap_s=0.05, budget_floor=10)
BREAKER = BreakerConfig(min_calls=10_000, consecutive_failures=6)   # primary opens in the last failover
MESSAGES = [{"role": "user", "content": "count my tokens please"}]


def metrics_settings(primary: MockUpstream, backup: MockUpstream, **overrides: Any) -> Settings:
    """Two providers, exact and glob routes, three policies, fast retries and a breaker that opens at 6."""
    return make_settings({"primary": primary.url, "backup": backup.url}, routes=ROUTES,
                         **{"policies": POLICIES, "retry": RETRY, "breaker": BREAKER, **overrides})


class ClockSleep:
    """The gateway's injected sleep: moves the fake clock instead of waiting."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    async def __call__(self, seconds: float) -> None:
        self.clock.advance(seconds)
        await asyncio.sleep(0)


class RecordingLog(AccessLog):
    """An access log that also keeps every record, for comparing totals."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[AccessRecord] = []

    def write(self, record: AccessRecord) -> None:
        self.records.append(record)
        super().write(record)


async def mixed_traffic(gateway: RunningGateway, http: Http, primary: MockUpstream,
                        backup: MockUpstream) -> dict[str, list[int]]:
    """Success, stream, embeddings, a budget refusal, 429, 5xx and two failovers; statuses by kind.

    Upstream attempts: primary 18, backup 2. Retries on primary: 2 for 429, 6 for 500. The second
    failover is primary's sixth consecutive failure, which opens its breaker.
    """
    chat = {"model": "gpt-4o-mini", "messages": MESSAGES}
    statuses: dict[str, list[int]] = {}

    async def send(kind: str, path: str, body: dict[str, Any]) -> None:
        statuses.setdefault(kind, []).append((await http(gateway, "POST", path, json=body)).status)

    for _ in range(2):
        await send("ok", "/v1/chat/completions", chat)
    await send("stream", "/v1/chat/completions",
               {**chat, "stream": True, "stream_options": {"include_usage": True}})
    for _ in range(2):
        await send("embed", "/v1/embeddings", {"model": "text-embedding-3-small", "input": "hello world"})
    for status, kind in ((429, "rate_limited"), (500, "server_error")):
        primary.script(*[Action(status=status)] * 3)
        await send(kind, "/v1/chat/completions", chat)
        await send("ok", "/v1/chat/completions", chat)
    primary.script(*[Action(status=500)] * 6)
    for _ in range(2):
        await send("failover", "/v1/chat/completions", {"model": "gpt-4.1", "messages": MESSAGES})
    return statuses


async def scrape(gateway: RunningGateway, http: Http, key: str | None = None) -> str:
    """The /metrics text; fails the test unless it is a 200."""
    reply = await http(gateway, "GET", "/metrics", key=key)
    assert reply.status == 200, reply.body
    return reply.body.decode()


def samples(text: str) -> list[Sample]:
    """Every sample of an exposition: (name, labels, value)."""
    return [(s.name, dict(s.labels), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, **labels: str) -> float | None:
    """The value of the one sample with exactly these labels, or None."""
    found = [v for n, ls, v in samples(text) if n == name and ls == labels]
    assert len(found) <= 1
    return found[0] if found else None


def total(text: str, name: str, **labels: str) -> float:
    """The sum of a sample name's values over series matching `labels`."""
    return sum(v for n, ls, v in samples(text) if n == name and labels.items() <= ls.items())


def sample_names(text: str) -> set[str]:
    """Sample names as exposed (`x_total`, `x_bucket`, `x_sum`, `x_count`, gauges as is)."""
    return {name for name, _, _ in samples(text)}


def promtool() -> str:
    """The promtool binary; a missing one fails under CI=true and skips the test otherwise."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing (CI installs the Debian 'prometheus' package)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return path


def run_promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool and return the finished process (output captured)."""
    return subprocess.run([promtool(), *args], input=stdin, capture_output=True, text=True, timeout=60)
