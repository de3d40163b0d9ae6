"""The `gateway` command as a user runs it: check, status."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.settings import ADMIN_KEY, CLIENT_KEY, make_policy, make_settings

FIXTURES = Path(__file__).parent / "fixtures" / "config"
ROOT = Path(__file__).resolve().parent.parent


def gateway_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOCK_")}
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True,
                          timeout=60, env=env, cwd=ROOT)


@pytest.mark.parametrize("mistake, expected", [
    ("unknown_key", "unknown_key/config.yaml: server.hots: unknown key"),
    ("missing_env_var", "missing_env_var/config.yaml: providers.mock.api_key: environment variable MOCK_KEY_NOT_SET"),
    ("port_not_integer", "port_not_integer/config.yaml: server.port: must be an integer"),
    ("route_unknown_provider", "route_unknown_provider/config.yaml: routes.gpt-4.1[1]: unknown provider 'nope'"),
    ("policy_match_unknown_team", "policy_match_unknown_team/policies/team.yaml: match.teams[0]: no key has team "
                                  "'wbe', so the policy can never match; did you mean 'web'?"),
    ("policy_match_unknown_key_name", "policy_match_unknown_key_name/policies/team.yaml: match.keys[0]: no key is "
                                      "named 'web-ap', so the policy can never match; did you mean 'web-app'?"),
    ("policy_match_model_unrouted", "policy_match_model_unrouted/policies/team.yaml: match.models[0]: no route "
                                    "serves a model matching 'gpt4*', so the policy can never match; did you mean "
                                    "'gpt-4*'?"),
    ("policy_budgets_misspelled", "policy_budgets_misspelled/policies/team.yaml: budgts: unknown key; did you mean "
                                  "'budgets'?"),
])
def test_check_names_the_file_and_key_path_and_fails(mistake: str, expected: str) -> None:
    result = gateway_cli("check", "--config", str(FIXTURES / mistake / "config.yaml"))
    assert result.returncode != 0
    assert expected in result.stderr


def test_check_accepts_the_shipped_configs_and_summarizes_without_secrets() -> None:
    result = gateway_cli("check", "--config", "demo.yaml")
    assert result.returncode == 0, result.stderr
    assert "providers: mock" in result.stdout and "policies: 3" in result.stdout
    assert "sk-mock" not in result.stdout


def test_check_says_when_metrics_are_public(tmp_path: Path) -> None:
    config = (FIXTURES / "glob_and_upstream_unpriced_ok" / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text("server: {host: 0.0.0.0}\n" + config)
    result = gateway_cli("check", "--config", str(tmp_path / "config.yaml"))
    assert result.returncode == 0, result.stderr
    assert "server: 0.0.0.0:8080, auth: keys, /metrics: public (no metrics_key set)" in result.stdout


async def run_cli(*args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", *args, cwd=ROOT,
                                                   stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    return process.returncode or 0, out.decode()


async def test_status_prints_budgets_with_bars_and_breakers_for_the_admin(upstream, start_gateway, http):
    policies = (make_policy("global", requests=4), make_policy("team-data", usd="1", teams=("data",)))
    gateway = await start_gateway(make_settings({"primary": upstream.url}, policies=policies))
    await http(gateway, "POST", "/v1/chat/completions",
               json={"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})

    code, client_view = await run_cli("status", "--url", gateway.url, "--key", CLIENT_KEY)
    assert code == 0, client_view
    assert "global" in client_view and "team-data" not in client_view
    assert "[#####..............." in client_view and "25.0%" in client_view   # 1 of 4 requests
    assert "BREAKER" not in client_view

    code, admin_view = await run_cli("status", "--url", gateway.url, "--key", ADMIN_KEY)
    assert code == 0 and "team-data" in admin_view and "primary" in admin_view and "closed" in admin_view


async def test_status_reports_an_unknown_key_and_exits_non_zero(upstream, start_gateway):
    gateway = await start_gateway(make_settings({"primary": upstream.url}))
    code, output = await run_cli("status", "--url", gateway.url, "--key", "sk-wrong")
    assert code == 1 and "401" in output
