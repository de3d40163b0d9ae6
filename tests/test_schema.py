"""The published JSON Schema: `gateway schema` prints what the repository ships, and it takes the shipped files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "config"


def printed_schema(*args: str) -> str:
    """What `gateway schema ARGS` prints."""
    result = subprocess.run([sys.executable, "-m", "gateway", "schema", *args], capture_output=True, text=True,
                            timeout=60, cwd=ROOT, check=True)
    return result.stdout


def validator(kind: str) -> jsonschema.Draft202012Validator:
    """A validator for one kind of file, from the shipped schema."""
    schema = json.loads((ROOT / f"{kind}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def problems(kind: str, document: Any) -> list[str]:
    """Where `document` breaks the `kind` schema, as key paths."""
    return sorted(".".join(map(str, error.absolute_path)) for error in validator(kind).iter_errors(document))


def read(path: Path) -> Any:
    """A YAML file as an editor's schema validator sees it."""
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("kind", ["config", "policy", "pricing"])
def test_the_shipped_schema_is_what_gateway_schema_prints(kind: str) -> None:
    assert (ROOT / f"{kind}.schema.json").read_text() == printed_schema(kind)


def test_gateway_schema_prints_the_config_schema_by_default() -> None:
    assert json.loads(printed_schema())["title"] == "gateway config.yaml"


@pytest.mark.parametrize("config", ["config.yaml", "demo.yaml"])
def test_the_shipped_configs_and_what_they_reference_validate(config: str) -> None:
    document = read(ROOT / config)
    assert problems("config", document) == []
    assert problems("pricing", read(ROOT / document["pricing"])) == []
    policy_files = sorted((ROOT / document.get("policies", "policies")).glob("*.yaml"))
    assert len(policy_files) == 2
    for policy_file in policy_files:
        assert problems("policy", read(policy_file)) == [], policy_file


def test_the_schema_refuses_what_the_loader_refuses() -> None:
    assert problems("config", read(FIXTURES / "unknown_key" / "config.yaml")) == [
        "", "pricing", "providers.mock.timeouts", "routes.gpt-4.1.0", "server"]   # rate_limits is at the top
    assert problems("config", read(FIXTURES / "port_out_of_range" / "config.yaml")) == ["server.port"]
    assert problems("policy", read(FIXTURES / "policy_negative_limit" / "policies" / "team.yaml")) == [
        "budgets.0.usd"]


def test_references_stand_for_numbers_booleans_and_choices() -> None:
    document = read(ROOT / "demo.yaml")
    document["server"] = {"port": "${PORT:-8080}", "access_log": "${LOG:-false}", "auth": "${AUTH}"}
    assert problems("config", document) == []
    document["server"] = {"port": "eighty", "access_log": "maybe"}
    assert problems("config", document) == ["server.access_log", "server.port"]


def test_split_canary_and_rules_routes_validate_and_a_mistake_inside_one_is_pointed_at() -> None:
    document = read(ROOT / "demo.yaml")
    document["routes"] = {
        "gpt-4.1": {"split": [{"provider": "mock", "weight": 95}, {"provider": "mock", "weight": 5}], "sticky": "key"},
        "deepseek-v3.2": {"canary": {"control": "mock", "candidate": {"provider": "mock"}, "steps": [5, 100],
                                     "promote_after": {"requests": 500, "minutes": 10},
                                     "rollback_if": {"error_rate": 0.05, "p95_latency_ratio": 1.5}}},
        "auto": {"rules": [{"when": {"prompt_tokens_max": 200, "tools": False, "tier": "cheap"},
                            "model": "deepseek-v3.2"}, {"model": "gpt-4.1"}]},
        "gpt-4o-mini": ["mock"],
    }
    assert problems("config", document) == []
    document["routes"]["gpt-4.1"]["split"][1]["weight"] = 0
    document["routes"]["auto"]["rules"][0]["when"]["tols"] = True
    assert problems("config", document) == ["routes.auto.rules", "routes.gpt-4.1.split"]   # (each may be null)
