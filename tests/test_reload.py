"""Live reload under load: valid edits apply within 2 s, invalid ones keep the last good config."""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from pathlib import Path

import pytest

from gateway.config import reload as reload_module
from gateway.config.loader import load_settings
from gateway.config.reload import fingerprint
from gateway.http.appkeys import CONFIG, RELOADER
from gateway.http.auth import key_digest
from tests.support.canary import CANARY_KEY
from tests.support.metrics import scrape, value
from tests.support.settings import CLIENT_KEY

CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}

CONFIG_YAML = """
server: {{host: 127.0.0.1, port: 8080}}
store: {{path: {tmp}/budget.db, journal_path: {tmp}/journal.jsonl}}
providers:
  primary: {{base_url: "{upstream}", api_key: "{key}"}}
routes:
  gpt-4.1: [primary]
pricing:
  gpt-4.1: {{input: 2.00, output: 8.00, max_output_tokens: 100}}
keys:
  - {{name: web-app, team: web, sha256: {digest}}}
policies: policies
"""
POLICY_YAML = "name: global\nbudgets:\n  - period: daily\n    requests: {limit}\n"
INVALID_EDITS = {
    "bad YAML": ("policies/global.yaml", "name: global\nbudgets: [period: daily\n"),
    "unknown key": ("policies/global.yaml", POLICY_YAML.format(limit=10) + "colour: blue\n"),
    "negative limit": ("policies/global.yaml", POLICY_YAML.format(limit=-5)),
    "duplicate name": ("policies/copy.yaml", POLICY_YAML.format(limit=7)),
    "half-written file": ("policies/global.yaml", POLICY_YAML.format(limit=10)[:30]),
    "empty file": ("policies/global.yaml", ""),
}
NEVER_MATCHING = {   # a policy edit that can never match, and the suggestion the refusal gives
    "teams: [wbe]": "match.teams[0]: no key has team 'wbe', so the policy can never match; did you mean 'web'?",
    "keys: [web-ap]": "match.keys[0]: no key is named 'web-ap', so the policy can never match; did you mean "
                      "'web-app'?",
    'models: ["gpt4*"]': "match.models[0]: no route serves a model matching 'gpt4*', so the policy can never "
                         "match; did you mean 'gpt-4*'?",
}


@pytest.fixture
def config_dir(tmp_path: Path, upstream) -> Path:
    (tmp_path / "policies").mkdir()
    (tmp_path / "config.yaml").write_text(CONFIG_YAML.format(
        tmp=tmp_path, upstream=upstream.url, key=CANARY_KEY, digest=key_digest(CLIENT_KEY)))
    (tmp_path / "policies" / "global.yaml").write_text(POLICY_YAML.format(limit=1000))
    return tmp_path


def limit_of(app) -> int:
    [policy] = app[CONFIG].current.policies
    return policy.budgets[0].requests


async def until(condition, timeout_s: float = 3.0) -> float:
    """Wait until `condition()` holds; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, "condition not reached in time"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def load(gateway, http, statuses: list[int], stop: asyncio.Event) -> None:
    """Steady traffic, bounded in count, until told to stop."""
    for _ in range(5000):
        if stop.is_set():
            return
        statuses.append((await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status)


async def test_a_valid_edit_applies_within_2s_under_load_without_failing_a_request(config_dir, start_gateway, http):
    path = str(config_dir / "config.yaml")
    gateway = await start_gateway(load_settings(path), config_path=path)
    statuses: list[int] = []
    stop = asyncio.Event()
    traffic = asyncio.create_task(load(gateway, http, statuses, stop))
    await until(lambda: len(statuses) > 20)

    (config_dir / "policies" / "global.yaml").write_text(POLICY_YAML.format(limit=2000))
    took = await until(lambda: limit_of(gateway.app) == 2000)
    await until(lambda: len(statuses) > 60)
    stop.set()
    await traffic

    assert took < 2.0
    assert statuses and set(statuses) == {200}
    assert gateway.app[RELOADER].results["success"] == 1


@pytest.mark.parametrize("mistake", list(INVALID_EDITS))
async def test_an_invalid_edit_keeps_the_last_good_config(config_dir, start_gateway, http, caplog, mistake):
    caplog.set_level(logging.ERROR, "gateway.config")
    path = str(config_dir / "config.yaml")
    gateway = await start_gateway(load_settings(path), config_path=path)
    reloader = gateway.app[RELOADER]
    good = gateway.app[CONFIG].current

    name, text = INVALID_EDITS[mistake]
    (config_dir / name).write_text(text)
    await until(lambda: reloader.results["failure"] == 1)

    assert gateway.app[CONFIG].current is good
    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    refused = [r.getMessage() for r in caplog.records if "reload refused" in r.getMessage()]
    assert refused and all("policies/" in line for line in refused), refused


@pytest.mark.parametrize("match", list(NEVER_MATCHING))
async def test_a_policy_edit_that_can_never_match_is_refused_with_a_suggestion(config_dir, start_gateway, http,
                                                                                caplog, match):
    caplog.set_level(logging.ERROR, "gateway.config")
    path = str(config_dir / "config.yaml")
    gateway = await start_gateway(load_settings(path), config_path=path)
    reloader = gateway.app[RELOADER]
    good = gateway.app[CONFIG].current

    (config_dir / "policies" / "global.yaml").write_text(POLICY_YAML.format(limit=10) + f"match: {{{match}}}\n")
    await until(lambda: reloader.results["failure"] == 1)

    assert gateway.app[CONFIG].current is good and limit_of(gateway.app) == 1000
    assert (await http(gateway, "POST", "/v1/chat/completions", json=CHAT)).status == 200
    refused = [r.getMessage() for r in caplog.records if "reload refused" in r.getMessage()]
    assert [line.split("config: ", 1)[1] for line in refused] == [
        f"{config_dir / 'policies' / 'global.yaml'}: {NEVER_MATCHING[match]}"]


async def test_the_watcher_survives_an_exception_logs_it_once_counts_it_and_applies_a_later_edit(
        config_dir, start_gateway, http, caplog, monkeypatch):
    caplog.set_level(logging.ERROR, "gateway")
    path = str(config_dir / "config.yaml")
    gateway = await start_gateway(load_settings(path), config_path=path)
    failed = []

    def fingerprint_failing_once(files):
        if not failed:
            failed.append(True)
            raise OSError(errno.EMFILE, "Too many open files")
        return fingerprint(files)

    monkeypatch.setattr(reload_module, "fingerprint", fingerprint_failing_once)
    await until(lambda: failed)
    (config_dir / "policies" / "global.yaml").write_text(POLICY_YAML.format(limit=2000))
    await until(lambda: limit_of(gateway.app) == 2000)

    lines = [r.getMessage() for r in caplog.records if "config_reload" in r.getMessage()]
    assert len(lines) == 1 and "Too many open files" in lines[0], lines
    text = await scrape(gateway, http)
    assert value(text, "gateway_background_failures_total", task="config_reload") == 1
    assert gateway.app[RELOADER].results["success"] == 1
