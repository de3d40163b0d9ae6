"""Load config.yaml, and the pricing and policy files it names, into frozen `Settings`.

Each file goes through two passes, as in envoy's ratelimit: pass one (`schema`) rejects unknown keys and
misshapen values; pass two (`node`) decodes typed values and checks them and their cross-references. A
file with misshapen values is not decoded; otherwise the problems of both passes are collected and raised
together as one ConfigError, each naming the file and the key path. `${VAR}` references in string values
are resolved from `env` during pass two: this is the only place the gateway reads the environment.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

from gateway.auth import key_digest
from gateway.config.globs import is_glob
from gateway.config.hosts import is_loopback
from gateway.config.model import (
    ApiKey, BreakerConfig, CallerIdentity, ModelPrice, Policy, ProviderConfig, ProviderTimeouts,
    RetryConfig, Route, RouteTarget, ServerConfig, Settings, StoreConfig,
)
from gateway.config.node import (
    FRACTION, Doc, InvalidValue, Node, above, as_name, as_text, at_least, between, is_name, repeats,
)
from gateway.config.policies import decode_policies, report_duplicate_names
from gateway.config.prices import Prices, decode_prices, target_price
from gateway.config.reach import Reach
from gateway.config.schema import CONFIG_FILE, POLICY_FILE, PRICING_FILE
from gateway.config.shape import Shape
from gateway.config.summary import startup_line, summarize
from gateway.config.yamlfile import read_yaml
from gateway.errors import ConfigError, ConfigIssue

__all__ = ["load_settings", "summarize", "startup_line"]

_SERVER = ServerConfig()
_STORE = StoreConfig()
_PROVIDER = ProviderConfig(name="", base_url="")
_TIMEOUTS = ProviderTimeouts()
_RETRY = RetryConfig()
_BREAKER = BreakerConfig()
_AUTH_MODES: tuple[Literal["keys", "none"], ...] = ("keys", "none")
_OUTAGE_MODES: tuple[Literal["fail_closed", "fail_open"], ...] = ("fail_closed", "fail_open")
_REDIS_SCHEMES = ("redis", "rediss", "redis+cluster", "redis+sentinel")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
_DEFAULT_POLICY_DIR = "policies"
_MIN_RESPONSE_BYTES = 1024   # below this even a short answer with its usage would be refused


def load_settings(path: str | Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the config at `path`; raise ConfigError listing every problem found."""
    config = Path(path)
    loading = _Loading(config.parent, config.absolute().parent, os.environ if env is None else env)
    root = loading.open(config, str(path), CONFIG_FILE)
    if root is None:
        raise ConfigError(loading.issues)
    settings = _decode(root, loading)
    if loading.issues:
        raise ConfigError(loading.issues)
    return settings


@dataclass
class _Loading:
    """One load in progress: where relative paths start, the environment, every issue and file read."""

    display_dir: Path
    base_dir: Path
    env: Mapping[str, str]
    issues: list[ConfigIssue] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def locate(self, relative: str) -> tuple[Path, str]:
        """Where `relative` (to the config file's directory) is on disk, and how messages name it."""
        return self.base_dir / relative, str(self.display_dir / relative)

    def open(self, path: Path, display: str, shape: Shape) -> Node | None:
        """Read a file and run pass one; its root node, or None when it cannot be decoded."""
        doc = Doc(display, self.env, self.issues)
        value = read_yaml(path, doc)
        if value is None:
            return None
        self.files.append(str(path.absolute()))
        return Node(value, "", doc) if shape.check(value, "", doc) else None

    def existing_file(self, node: Node) -> tuple[Path, str] | None:
        """The file `node` names, or None after reporting that it is not there."""
        relative = node.text(None)
        if relative is None:
            return None
        path, display = self.locate(relative)
        if not path.is_file():
            node.report(f"file not found: {display}")
            return None
        return path, display


def _decode(root: Node, loading: _Loading) -> Settings:
    """Pass two over config.yaml and the files it names."""
    server = _server(root.at("server"))
    store = _store(root.at("store"), loading.base_dir)
    providers = _providers(root.at("providers", required=True))
    prices = _pricing(root.at("pricing", required=True), loading)
    routes = _routes(root.at("routes", required=True), providers, prices)
    keys = _keys(root.at("keys"))
    reach = Reach.of(server, keys, routes, prices)
    policies = _policies(root.at("policies"), loading, reach)
    return Settings(
        server=server, store=store, providers=providers, routes=routes, pricing=prices or {}, keys=keys,
        policies=policies, retry=_retry(root.at("retry")), breaker=_breaker(root.at("breaker")),
        source_files=tuple(loading.files),
    )


def _server(node: Node) -> ServerConfig:
    """The `server` section; `auth: none` only on a loopback host."""
    host = node.at("host").text(_SERVER.host)
    auth = node.at("auth").choice(_AUTH_MODES, _SERVER.auth)
    if auth == "none" and not is_loopback(host):
        node.at("auth").report(
            "'none' is only allowed when server.host is a loopback address (127.0.0.0/8, ::1, localhost)")
    return ServerConfig(
        host=host,
        port=node.at("port").integer(_SERVER.port, between(0, 65535)),
        max_body_bytes=node.at("max_body_bytes").integer(_SERVER.max_body_bytes, at_least(1)),
        client_timeout_s=node.at("client_timeout_s").number(_SERVER.client_timeout_s, above(0)),
        header_timeout_s=node.at("header_timeout_s").number(_SERVER.header_timeout_s, above(0)),
        keepalive_timeout_s=node.at("keepalive_timeout_s").number(_SERVER.keepalive_timeout_s, above(0)),
        max_connections=node.at("max_connections").integer(_SERVER.max_connections, at_least(1)),
        shutdown_grace_s=node.at("shutdown_grace_s").number(_SERVER.shutdown_grace_s, at_least(0)),
        auth=auth,
        admin_key_sha256=_server_key_digest(node, "admin_key"),
        metrics_key_sha256=_server_key_digest(node, "metrics_key"),
        access_log=node.at("access_log").flag(_SERVER.access_log),
    )


def _server_key_digest(server: Node, name: str) -> str | None:
    """A server key's digest, from `<name>` (plaintext, hashed here) or `<name>_sha256`."""
    plain = server.at(name).text("")
    digest = server.at(f"{name}_sha256").parse(_sha256_hex, None)
    if plain and digest:
        server.at(name).report(f"set {name} or {name}_sha256, not both")
    return key_digest(plain) if plain else digest


def _store(node: Node, base_dir: Path) -> StoreConfig:
    """The `store` section; an empty url means the embedded store, paths resolve against `base_dir`."""
    return StoreConfig(
        url=node.at("url").parse(_redis_url, None),
        path=str(base_dir / node.at("path").text(_STORE.path)),
        timeout_s=node.at("timeout_s").number(_STORE.timeout_s, above(0)),
        pool_size=node.at("pool_size").integer(_STORE.pool_size, at_least(1)),
        on_outage=node.at("on_outage").choice(_OUTAGE_MODES, _STORE.on_outage),
        fail_open_allowance=node.at("fail_open_allowance").decimal(_STORE.fail_open_allowance, between(0, 1)),
        lease_s=node.at("lease_s").number(_STORE.lease_s, above(0)),
        reserve_ahead=node.at("reserve_ahead").flag(_STORE.reserve_ahead),
        reserve_ahead_idle_s=node.at("reserve_ahead_idle_s").number(_STORE.reserve_ahead_idle_s, above(0)),
        journal_path=str(base_dir / node.at("journal_path").text(_STORE.journal_path)),
        ledger_max_entries=node.at("ledger_max_entries").integer(_STORE.ledger_max_entries, at_least(1)),
    )


def _redis_url(value: Any) -> str | None:
    """A Redis URL, or None for an empty string (the embedded store)."""
    text = as_text(value)
    if not text:
        return None
    parts = _url_parts(text)
    if parts is None or parts.scheme not in _REDIS_SCHEMES or not parts.netloc:
        raise InvalidValue("must be a redis://, rediss://, redis+cluster:// or redis+sentinel:// URL, or empty")
    return text


def _providers(node: Node) -> dict[str, ProviderConfig]:
    """The `providers` mapping, by name."""
    return {name: _provider(name, provider) for name, provider in node.entries()}


def _provider(name: str, node: Node) -> ProviderConfig:
    """One upstream."""
    if not is_name(name):
        node.report("provider name must use only letters, digits, '_', '.' and '-'")
    return ProviderConfig(
        name=name,
        base_url=node.at("base_url", required=True).parse(_http_url, ""),
        api_key=node.at("api_key").text(""),
        headers=tuple((header, value.text("")) for header, value in node.at("headers").entries()),
        timeouts=_timeouts(node.at("timeouts")),
        max_connections=node.at("max_connections").integer(_PROVIDER.max_connections, at_least(1)),
        max_response_bytes=node.at("max_response_bytes").integer(_PROVIDER.max_response_bytes,
                                                                 at_least(_MIN_RESPONSE_BYTES)),
    )


def _http_url(value: Any) -> str:
    """An http(s) URL with a host, without a trailing slash."""
    text = as_text(value)
    parts = _url_parts(text)
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname or not _port_ok(parts):
        raise InvalidValue("must be an http(s) URL")
    return text.rstrip("/")


def _url_parts(text: str) -> SplitResult | None:
    """urlsplit's result, or None when the URL cannot be parsed (e.g. a broken IPv6 host)."""
    try:
        return urlsplit(text)
    except ValueError:
        return None


def _port_ok(parts: SplitResult) -> bool:
    """True when the URL's port, if any, is a number from 0 to 65535 (urlsplit raises otherwise)."""
    try:
        return parts.port is None or parts.port >= 0
    except ValueError:
        return False


def _timeouts(node: Node) -> ProviderTimeouts:
    """A provider's client timeouts."""
    return ProviderTimeouts(
        connect_s=node.at("connect_s").number(_TIMEOUTS.connect_s, above(0)),
        read_s=node.at("read_s").number(_TIMEOUTS.read_s, above(0)),
        total_s=node.at("total_s").number(_TIMEOUTS.total_s, above(0)),
        stream_s=node.at("stream_s").number(_TIMEOUTS.stream_s, above(0)),
    )


def _pricing(node: Node, loading: _Loading) -> Prices:
    """Model prices, inline or from the file `pricing` names; None when they cannot be read."""
    if isinstance(node.value, dict):
        return decode_prices(node)
    located = loading.existing_file(node)
    root = loading.open(*located, PRICING_FILE) if located else None
    return decode_prices(root.at("models", required=True)) if root else None


def _routes(node: Node, providers: Mapping[str, ProviderConfig], prices: Prices) -> tuple[Route, ...]:
    """The `routes` mapping, in file order."""
    return tuple(_route(pattern, targets, providers, prices) for pattern, targets in node.entries())


def _route(pattern: str, node: Node, providers: Mapping[str, ProviderConfig], prices: Prices) -> Route:
    """One route: known providers, each once; every target of a plain model name priced (see target_price).

    A glob's targets are priced per model at request time: one that cannot be is refused there (404).
    """
    if not node.elements():
        node.report("must list at least one provider")
    found = [target for target in (_target(element, providers) for element in node.elements()) if target]
    if prices is not None and not is_glob(pattern):
        _check_priced(pattern, node, found, prices)
    for name, provider, first in repeats((name, target.provider) for name, target in found):
        name.report(f"provider {name.quoted(provider)} is already listed at {first.path}")
    return Route(pattern, tuple(target for _, target in found))


def _check_priced(model: str, node: Node, found: list[tuple[Node, RouteTarget]],
                  prices: dict[str, ModelPrice]) -> None:
    """Report the targets of `model`'s route that have no price by the pricing rule (see `target_price`)."""
    if model in prices:
        return                               # every target falls back on the client model's price
    unpriced = [target.provider for _, target in found
                if target_price(prices, model, target.upstream_model) is None]
    if len(unpriced) == len(found):
        node.report(f"model '{model}' has no price")
        return
    for provider in unpriced:
        node.report(f"model '{model}' has no price for provider '{provider}': every target of a route needs one "
                    "(its upstream model's, else the client model's)")


def _target(node: Node, providers: Mapping[str, ProviderConfig]) -> tuple[Node, RouteTarget] | None:
    """A known provider, named alone or as {provider, model} with the model name it knows; and its node."""
    name = node.at("provider", required=True) if isinstance(node.value, dict) else node
    provider = name.text(None)
    if provider is None:
        return None
    if provider not in providers:
        node.report(f"unknown provider {name.quoted(provider)}")
        return None
    return name, RouteTarget(provider, node.at("model").text(None))


def _keys(node: Node) -> tuple[ApiKey, ...]:
    """The client keys: names and keys unique."""
    pairs = [(element, _key(element)) for element in node.elements()]
    named = ((element.at("name"), key.identity.name) for element, key in pairs if key.identity.name)
    for name_node, name, first in repeats(named):
        name_node.report(f"duplicate key name {name_node.quoted(name)} (also at {first.path})")
    digests = ((element, key.sha256) for element, key in pairs if key.sha256)
    for element, _, first in repeats(digests):
        element.report(f"same key as {first.path}")
    return tuple(key for _, key in pairs)


def _key(node: Node) -> ApiKey:
    """One client key and the identity it carries."""
    identity = CallerIdentity(
        name=node.at("name", required=True).parse(as_name, ""),
        team=node.at("team").text(None),
        tags=node.at("tags").texts(),
        admin=node.at("admin").flag(False),
    )
    return ApiKey(sha256=_key_digest(node), identity=identity)


def _key_digest(node: Node) -> str:
    """The key's digest, from `sha256` or from the plaintext in the `key_env` variable."""
    digest, variable = node.at("sha256"), node.at("key_env")
    if digest.absent == variable.absent:
        node.report("needs exactly one of sha256 or key_env")
        return ""
    if variable.absent:
        return digest.parse(_sha256_hex, "")
    return _digest_from_env(variable)


def _digest_from_env(node: Node) -> str:
    """The digest of the plaintext key held by the environment variable `node` names."""
    name = node.text(None)
    if name is None:
        return ""
    secret = node.doc.env.get(name)
    if not secret:
        node.report(f"environment variable {name} is " + ("empty" if secret == "" else "not set"))
        return ""
    return key_digest(secret)


def _sha256_hex(value: Any) -> str:
    """A SHA-256 hex digest, lowercased."""
    text = as_text(value)
    if not _SHA256_HEX.fullmatch(text):
        raise InvalidValue("must be a SHA-256 hex digest (64 hex characters)")
    return text.lower()


def _policies(node: Node, loading: _Loading, reach: Reach) -> tuple[Policy, ...]:
    """Every policy in the policy files; names unique across files, matches that can match."""
    decoded = []
    for path, display in _policy_files(node, loading):
        root = loading.open(path, display, POLICY_FILE)
        if root is not None:
            decoded.extend(decode_policies(root, reach))
    report_duplicate_names(decoded)
    return tuple(policy for _, policy in decoded)


def _policy_files(node: Node, loading: _Loading) -> list[tuple[Path, str]]:
    """The listed files, or the *.yaml files of the directory (default `policies`, if it exists)."""
    if isinstance(node.value, list):
        return [located for element in node.elements() if (located := loading.existing_file(element))]
    if node.absent:
        path, display = loading.locate(_DEFAULT_POLICY_DIR)
        return _yaml_files_in(path, display) if path.is_dir() else []
    relative = node.text(None)
    if relative is None:
        return []
    path, display = loading.locate(relative)
    if not path.is_dir():
        node.report(f"directory not found: {display}")
        return []
    return _yaml_files_in(path, display)


def _yaml_files_in(directory: Path, display: str) -> list[tuple[Path, str]]:
    """The directory's *.yaml files, sorted by name."""
    return [(path, str(Path(display) / path.name)) for path in sorted(directory.glob("*.yaml")) if path.is_file()]


def _retry(node: Node) -> RetryConfig:
    """The `retry` section."""
    statuses = node.at("statuses")
    return RetryConfig(
        max_retries=node.at("max_retries").integer(_RETRY.max_retries, at_least(0)),
        statuses=_RETRY.statuses if statuses.absent else _statuses(statuses),
        backoff_base_s=node.at("backoff_base_s").number(_RETRY.backoff_base_s, at_least(0)),
        backoff_cap_s=node.at("backoff_cap_s").number(_RETRY.backoff_cap_s, at_least(0)),
        retry_after_cap_s=node.at("retry_after_cap_s").number(_RETRY.retry_after_cap_s, at_least(0)),
        deadline_s=node.at("deadline_s").number(_RETRY.deadline_s, above(0)),
        budget_ratio=node.at("budget_ratio").number(_RETRY.budget_ratio, at_least(0)),
        budget_floor=node.at("budget_floor").integer(_RETRY.budget_floor, at_least(0)),
    )


def _statuses(node: Node) -> tuple[int, ...]:
    """HTTP statuses worth a retry."""
    statuses = (element.integer(None, between(100, 599)) for element in node.elements())
    return tuple(status for status in statuses if status is not None)


def _breaker(node: Node) -> BreakerConfig:
    """The `breaker` section."""
    return BreakerConfig(
        window_s=node.at("window_s").number(_BREAKER.window_s, above(0)),
        min_calls=node.at("min_calls").integer(_BREAKER.min_calls, at_least(1)),
        failure_rate=node.at("failure_rate").number(_BREAKER.failure_rate, FRACTION),
        consecutive_failures=node.at("consecutive_failures").integer(_BREAKER.consecutive_failures, at_least(1)),
        open_s=node.at("open_s").number(_BREAKER.open_s, above(0)),
        open_max_s=node.at("open_max_s").number(_BREAKER.open_max_s, above(0)),
        half_open_probes=node.at("half_open_probes").integer(_BREAKER.half_open_probes, at_least(1)),
    )
