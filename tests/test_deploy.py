"""Deploy artifacts: the Prometheus alert rules (promtool) and the Grafana dashboard, against a real /metrics."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.clock import FakeClock
from gateway.config.model import CacheConfig, Policy, PolicyMatch, RateLimit, Route, RouteTarget
from gateway.config.routes import CanaryConfig
from tests.support.metrics import (
    MESSAGES, POLICIES, ClockSleep, metrics_settings, mixed_traffic, run_promtool, sample_names, scrape,
)

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
METRIC_NAME = re.compile(r"\bgateway_[a-z0-9_]+\b")
QUOTED = re.compile(r'"(?:[^"\\]|\\.)*"')
TEMPLATE_VARIABLES = {"$__rate_interval": "5m", "$policy": ".*", "$model": ".*"}
PANEL_TOPICS = ("spend against budget", "cost per hour by model", "forecast at the reset", "tokens by model",
                "requests by status class", "latency p50 / p95 / p99", "time to first token", "breaker states",
                "retries and failovers", "canaries", "cache hit rate", "cache savings")


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(container: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in container.get("panels", []):
        yield panel
        yield from panels(panel)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every query in the dashboard."""
    return [(panel["title"], target["expr"]) for panel in panels(dashboard()) for target in panel.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """The gateway metric names an expression reads (quoted label values left out)."""
    return set(METRIC_NAME.findall(QUOTED.sub('""', expr)))


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    checked = run_promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run_promtool("test", "rules", str(ALERT_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_firing_unit_test_and_some_case_does_not_fire() -> None:
    cases = [case for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    firing = {case["alertname"] for case in cases if case["exp_alerts"]}
    assert {rule["alert"] for rule in alert_rules()} == firing
    assert any(not case["exp_alerts"] for case in cases)


def test_dashboard_is_a_grafana_dashboard_with_the_promised_panels() -> None:
    board = dashboard()
    assert 36 <= board["schemaVersion"] <= 41 and board["uid"] and board["title"]
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
            assert panel["targets"] and {"x", "y", "w", "h"} <= panel["gridPos"].keys()
    titles = " | ".join(panel["title"].lower() for panel in panels(board))
    for topic in PANEL_TOPICS:
        assert topic in titles
    [ahead] = [panel for panel in panels(board) if panel["title"].lower().startswith("forecast")]
    # the gateway's own projection, in each policy's zone and calendar: no UTC month arithmetic in PromQL
    assert "gateway_budget_projected_at_reset" in ahead["targets"][0]["expr"]
    assert "days_in_month" not in json.dumps(ahead)


def test_dashboard_and_alert_queries_are_valid_promql(tmp_path: Path) -> None:
    exprs = [expr for _, expr in dashboard_queries()] + [rule["expr"] for rule in alert_rules()]
    for name, replacement in TEMPLATE_VARIABLES.items():
        exprs = [expr.replace(name, replacement) for expr in exprs]
    rules = {"groups": [{"name": "queries", "rules": [
        {"record": f"gateway:query_{index}", "expr": expr} for index, expr in enumerate(exprs)]}]}
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = run_promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_every_metric_in_the_dashboard_and_alerts_is_exposed_after_traffic(
        upstream, backup_upstream, start_gateway, http) -> None:
    clock = FakeClock()
    nano_rate = Policy(name="nano-rate", match=PolicyMatch(models=("gpt-4.1-nano",)),
                       rate_limits=(RateLimit(per="minute", requests=1),))
    canary = Route("deepseek-v3.2", (RouteTarget("primary"), RouteTarget("backup")),
                   canary=CanaryConfig(RouteTarget("primary"), RouteTarget("backup")))
    settings = metrics_settings(upstream, backup_upstream, policies=(*POLICIES, nano_rate),
                                cache=CacheConfig(models=("gpt-4.1",)))
    settings = dataclasses.replace(settings, routes=(*settings.routes, canary))
    gateway = await start_gateway(settings, clock=clock, sleep=ClockSleep(clock))
    for _ in range(2):                       # the second is refused by the rate limit
        await http(gateway, "POST", "/v1/chat/completions", json={"model": "gpt-4.1-nano", "messages": MESSAGES})
    await mixed_traffic(gateway, http, upstream, backup_upstream)     # its gpt-4.1 requests fail: nothing kept
    await http(gateway, "POST", "/v1/chat/completions", json={"model": "deepseek-v3.2", "messages": MESSAGES})
    for _ in range(2):                                                # a miss kept, then a hit
        await http(gateway, "POST", "/v1/chat/completions", json={"model": "gpt-4.1", "messages": [
            {"role": "user", "content": "cache me"}]})
    exposed = sample_names(await scrape(gateway, http))
    used = [(title, name) for title, expr in dashboard_queries() for name in metric_names(expr)]
    used += [(rule["alert"], name) for rule in alert_rules() for name in metric_names(rule["expr"])]
    assert len(used) > 20
    missing = [(title, name) for title, name in used if name not in exposed]
    assert not missing


@pytest.mark.parametrize(("expr", "names"), [
    ('sum(rate(gateway_requests_total{route="gateway_fake"}[5m]))', {"gateway_requests_total"}),
    ("histogram_quantile(0.9, sum by (le) (rate(gateway_x_seconds_bucket[5m])))", {"gateway_x_seconds_bucket"}),
])
def test_metric_names_are_read_from_expressions_without_label_values(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
