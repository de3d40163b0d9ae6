"""The gateway config the bench runs, and its named variants: the same config with one thing changed.

A variant edits the config and policy documents before they are written; a gateway target named
`gateway-<variant>` runs it (`gateway` runs "default", `gateway-base` runs "default" from the --baseline
build). To bench a new feature against a plain route, add a variant here: `--targets` and
`--instruction-targets` take its target name from then on.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CLIENT_KEY = "sk-bench-client-0001"      # bench-only keys, not secrets
ADMIN_KEY = "sk-bench-admin-0002"
PROVIDER_KEY = "sk-bench-provider-0003"
TEAM_POLICY = "bench-team"
GATEWAY = "gateway"
BASELINE = "gateway-base"
HEADER = "# Written by bench/bench.py (bench/gateway_config.py, variant {variant}).\n"

Document = dict[str, Any]


def base_config(port: int, redis_url: str, upstream: str) -> Document:
    """A realistic gateway config against the bench's mock upstream, every feature on."""
    return {
        "server": {"host": "127.0.0.1", "port": port, "auth": "keys", "admin_key": "${BENCH_ADMIN_KEY}",
                   "access_log": True},
        "store": {"url": redis_url, "timeout_s": 0.25, "pool_size": 64, "on_outage": "fail_closed",
                  "journal_path": "./journal.jsonl"},
        "providers": {"mock": {"base_url": upstream, "api_key": "${BENCH_PROVIDER_KEY}",
                               "timeouts": {"connect_s": 2, "read_s": 30, "total_s": 60}, "max_connections": 256}},
        "routes": {"gpt-4o-mini": ["mock"]},
        "pricing": {"gpt-4o-mini": {"input": 0.15, "output": 0.60, "cached_input": 0.075,
                                    "max_output_tokens": 16384}},
        "keys": [{"name": "bench-client", "team": "bench", "tags": ["bench"], "key_env": "BENCH_CLIENT_KEY"}],
        "policies": ["policies.yaml"],
        "retry": {"max_retries": 2, "statuses": [429, 500, 502, 503, 504], "backoff_base_s": 0.25,
                  "deadline_s": 60},
        "breaker": {"window_s": 30, "min_calls": 10, "failure_rate": 0.5, "consecutive_failures": 5, "open_s": 15},
    }


def base_policies() -> Document:
    """Two matching policies: a request reserves and settles three counters in one store round trip."""
    return {"policies": [
        {"name": "bench-global", "budgets": [{"period": "daily", "usd": 100000}, {"period": "monthly", "usd": 1000000}]},
        {"name": TEAM_POLICY, "match": {"teams": ["bench"]},
         "budgets": [{"period": "daily", "usd": 100000, "tokens": 1_000_000_000_000, "requests": 1_000_000_000}]},
    ]}


def _default(config: Document, policies: Document) -> None:
    """Every feature on."""


def _no_access_log(config: Document, policies: Document) -> None:
    """The access log off."""
    config["server"]["access_log"] = False


def _no_budget(config: Document, policies: Document) -> None:
    """One policy that no caller of the bench matches (its team's key is never used): nothing is reserved."""
    config["keys"].append({"name": "bench-unused", "team": "nobody", "sha256": hashlib.sha256(b"unused").hexdigest()})
    policies["policies"] = [{"name": "bench-unmatched", "match": {"teams": ["nobody"]},
                             "budgets": [{"period": "daily", "usd": 1}]}]


def _cache_hit(config: Document, policies: Document) -> None:
    """The response cache on for the bench's model: its body never changes, so every request after the
    first is a hit (no upstream call, no budget reserved; a ledger row in the background)."""
    config["cache"] = {"models": ["gpt-4o-mini"]}


def _cache_miss(config: Document, policies: Document) -> None:
    """The response cache on for another model only: each request takes the lookup decision (is its model
    cached?) and goes on as with the cache off."""
    config["routes"]["gpt-4.1-nano"] = ["mock"]
    config["pricing"]["gpt-4.1-nano"] = {"input": 0.10, "output": 0.40}
    config["cache"] = {"models": ["gpt-4.1-nano"]}


def _cache_store_miss(config: Document, policies: Document) -> None:
    """The response cache on for the bench's model, and every request's body made unique by its client
    (CLIENT_UNIQUE_BODIES): each reads the store, misses, goes upstream and has its answer written to the
    store; the whole cost of a miss."""
    config["cache"] = {"models": ["gpt-4o-mini"]}


def _cache_refresh(config: Document, policies: Document) -> None:
    """The response cache on for the bench's model, every request sent with `Cache-Control: no-cache`
    (CLIENT_HEADERS): no lookup, each goes upstream and its answer is written to the store, as a miss's is
    (a miss also reads the store once: one more call like the write)."""
    config["cache"] = {"models": ["gpt-4o-mini"]}


CLIENT_HEADERS = {"cache-refresh": {"Cache-Control": "no-cache"}}
"""Request headers a variant's clients send."""
CLIENT_UNIQUE_BODIES = frozenset({"cache-store-miss"})
"""Variants whose clients send no two bodies alike (bench/post.lua BENCH_UNIQUE)."""

def _rate_limits(config: Document, policies: Document) -> None:
    """The team policy counted per key, with a per-key minute window (requests and tokens) so high it never
    refuses (acceptance 9 of issue 18): every request holds on its window beside its budgets, in the same
    store call or spare reservation."""
    team = next(policy for policy in policies["policies"] if policy["name"] == TEAM_POLICY)
    team |= {"each": "key", "rate_limits": [{"per": "minute", "requests": 1_000_000_000, "tokens": 1_000_000_000_000}]}


def _rate_limits_strict(config: Document, policies: Document) -> None:
    """`rate-limits` plus a per-second window and max_concurrent: lines no spare reservation may hold, so every
    request reserves in the store itself."""
    _rate_limits(config, policies)
    team = next(policy for policy in policies["policies"] if policy["name"] == TEAM_POLICY)
    team["max_concurrent"] = 1_000_000
    team["rate_limits"].append({"per": "second", "requests": 1_000_000_000})


def _second_provider(config: Document) -> None:
    """A second provider on the bench's one mock upstream, for routes with arms."""
    config["providers"]["mock-b"] = copy.deepcopy(config["providers"]["mock"])


def _split(config: Document, policies: Document) -> None:
    """The bench route split 95/5 over two providers, sticky per key."""
    _second_provider(config)
    config["routes"]["gpt-4o-mini"] = {"split": [{"provider": "mock", "weight": 95},
                                                 {"provider": "mock-b", "weight": 5}], "sticky": "key"}


def _canary(config: Document, policies: Document) -> None:
    """The bench route as a canary held at its first step (50%): each request picks an arm and is tallied."""
    _second_provider(config)
    config["routes"]["gpt-4o-mini"] = {"canary": {
        "control": "mock", "candidate": "mock-b", "steps": [50, 100],
        "promote_after": {"requests": 1_000_000_000, "minutes": 100_000}}}


VARIANTS: dict[str, Callable[[Document, Document], None]] = {
    "default": _default,
    "no-access-log": _no_access_log,
    "no-budget": _no_budget,
    "cache-hit": _cache_hit,
    "cache-miss": _cache_miss,
    "cache-store-miss": _cache_store_miss,
    "cache-refresh": _cache_refresh,
    "rate-limits": _rate_limits,
    "rate-limits-strict": _rate_limits_strict,
    "split": _split,
    "canary": _canary,
}


@dataclass(frozen=True)
class WrittenConfig:
    """A config on disk and what the bench can check of a gateway that runs it."""

    path: Path
    access_log: bool      # its chat 200 lines can be counted
    budgeted: bool        # the team policy applies: its budget moves by every request
    cached: bool = False  # the bench's answers are kept: a request after the first reaches neither the
    #                       upstream nor the budget (so neither is checked per request)
    headers: tuple[tuple[str, str], ...] = ()   # sent with every request
    unique: bool = False  # its clients send no two bodies alike


def write_config(directory: Path, port: int, redis_url: str, upstream: str,
                 variant: str = "default") -> WrittenConfig:
    """The gateway config (and its policy file) of `variant` in `directory`."""
    config, policies = base_config(port, redis_url, upstream), base_policies()
    VARIANTS[variant](config, policies)
    header = HEADER.format(variant=variant)
    (directory / "policies.yaml").write_text(header + yaml.safe_dump(policies, sort_keys=False))
    path = directory / "gateway.yaml"
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    cache = config.get("cache", {})
    headers = tuple(CLIENT_HEADERS.get(variant, {}).items())
    unique = variant in CLIENT_UNIQUE_BODIES
    cached = ("gpt-4o-mini" in cache.get("models", ()) and cache.get("max_entry_bytes", 1 << 20) >= 64 * 1024
              and not headers and not unique)
    budgeted = any(policy["name"] == TEAM_POLICY for policy in policies["policies"]) and not cached
    return WrittenConfig(path, bool(config["server"]["access_log"]), budgeted, cached, headers, unique)


def target_name(variant: str) -> str:
    """The gateway target that runs `variant` from this tree."""
    return GATEWAY if variant == "default" else f"{GATEWAY}-{variant}"


def variant_of(target: str) -> str | None:
    """The variant a gateway target runs (`gateway-base` runs "default"); None when `target` is no gateway."""
    if target in (GATEWAY, BASELINE):
        return "default"
    variant = target.removeprefix(GATEWAY + "-")
    return variant if variant != target and variant in VARIANTS else None


def gateway_env(source: Path) -> dict[str, str]:
    """The environment of a gateway process: the bench's keys, and the gateway package of `source` first."""
    env = dict(os.environ, BENCH_ADMIN_KEY=ADMIN_KEY, BENCH_CLIENT_KEY=CLIENT_KEY, BENCH_PROVIDER_KEY=PROVIDER_KEY)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source), env.get("PYTHONPATH")]))
    return env
