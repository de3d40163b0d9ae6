"""The frozen, typed configuration the gateway runs on (built and validated by `gateway.config.loader`)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cached_property
from typing import Literal

__all__ = [
    "ServerConfig", "StoreConfig", "ProviderTimeouts", "ProviderConfig", "RouteTarget", "Route",
    "ModelPrice", "CallerIdentity", "ApiKey", "PolicyMatch", "BudgetLimit", "AlertConfig", "Policy",
    "RetryConfig", "BreakerConfig", "Settings",
]


@dataclass(frozen=True)
class ServerConfig:
    """How the gateway listens and talks to clients."""

    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 4 * 1024 * 1024
    client_timeout_s: float = 60.0           # how long a client may take to send its request body
    header_timeout_s: float = 10.0           # how long a client may take to send its request line and headers
    keepalive_timeout_s: float = 75.0        # an idle kept-alive client connection is closed after this
    max_connections: int = 4096              # open client connections (lowered to what the file limit allows)
    shutdown_grace_s: float = 30.0           # on SIGTERM, how long requests in flight may take to finish
    auth: Literal["keys", "none"] = "keys"
    admin_key_sha256: str | None = None      # hex digest; from `admin_key` (env) or `admin_key_sha256`
    metrics_key_sha256: str | None = None    # set: GET /metrics needs this bearer key (`metrics_key` or digest)
    access_log: bool = True


@dataclass(frozen=True)
class StoreConfig:
    """Where budget counters live: Redis when `url` is set, else the embedded SQLite file at `path`."""

    url: str | None = None                   # redis://, rediss://, redis+cluster://, redis+sentinel://
    path: str = "./data/gateway.db"
    timeout_s: float = 0.25                  # socket connect/read timeout for each store call
    pool_size: int = 64
    on_outage: Literal["fail_closed", "fail_open"] = "fail_closed"
    fail_open_allowance: Decimal = Decimal("0.01")   # share of each limit one replica may spend blind
    lease_s: float = 900.0                   # a reservation not settled by then turns into spend
    reserve_ahead: bool = True               # keep a spare reservation for the next request (budget/spares.py)
    reserve_ahead_idle_s: float = 1.0        # a spare not taken by then is released
    journal_path: str = "./data/journal.jsonl"
    ledger_max_entries: int = 1_000_000      # spend ledger rows kept (the oldest are trimmed)


@dataclass(frozen=True)
class ProviderTimeouts:
    """aiohttp client timeouts for one provider, in seconds."""

    connect_s: float = 5.0
    read_s: float = 120.0                    # between two reads (a stalled stream)
    total_s: float = 600.0
    stream_s: float = 600.0                  # relaying one stream, from its response head (see README)


@dataclass(frozen=True)
class ProviderConfig:
    """An OpenAI-compatible upstream. `api_key` comes from the environment; never log it."""

    name: str
    base_url: str                            # ends before /chat/completions, e.g. https://api.openai.com/v1
    api_key: str = field(default="", repr=False)
    headers: tuple[tuple[str, str], ...] = ()
    timeouts: ProviderTimeouts = ProviderTimeouts()
    max_connections: int = 256
    max_response_bytes: int = 32 * 1024 * 1024   # a larger non-streamed answer is a 502


@dataclass(frozen=True)
class RouteTarget:
    """One provider of a route, with the model name that provider knows."""

    provider: str
    upstream_model: str | None = None        # None: the client's model name is forwarded as is


@dataclass(frozen=True)
class Route:
    """A model name or glob and the providers that serve it, primary first."""

    pattern: str
    targets: tuple[RouteTarget, ...]

    def matches(self, model: str) -> bool:
        """True when `model` is this route's name or matches its glob."""
        return model == self.pattern or fnmatch.fnmatchcase(model, self.pattern)


@dataclass(frozen=True)
class ModelPrice:
    """USD per 1M tokens, exact Decimals as written in the pricing file."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None      # None: cached tokens cost the input price
    max_output_tokens: int = 4096            # worst case reserved when a request has no max_tokens

    @cached_property
    def whole_nano_per_token(self) -> tuple[int, int, int] | None:
        """(input, cached input, output) in nano-USD per token when all three are whole numbers."""
        cached = self.input if self.cached_input is None else self.cached_input
        rates = [rate * 1000 for rate in (self.input, cached, self.output)]   # USD/1M tokens -> nano-USD/token
        if any(rate != rate.to_integral_value() for rate in rates):
            return None
        return int(rates[0]), int(rates[1]), int(rates[2])


@dataclass(frozen=True)
class CallerIdentity:
    """Who is calling: what policies match on and what the access log names."""

    name: str
    team: str | None = None
    tags: tuple[str, ...] = ()
    admin: bool = False


@dataclass(frozen=True)
class ApiKey:
    """A client key known only by its SHA-256 hex digest."""

    sha256: str = field(repr=False)
    identity: CallerIdentity = CallerIdentity("anonymous")


@dataclass(frozen=True)
class PolicyMatch:
    """Which requests a policy applies to; every non-empty field must match, all empty = every request."""

    keys: tuple[str, ...] = ()               # caller names
    teams: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    models: tuple[str, ...] = ()             # globs on the client's model name


@dataclass(frozen=True)
class BudgetLimit:
    """Limits for one calendar period; None means that unit is not limited."""

    period: Literal["daily", "monthly"]
    usd: Decimal | None = None
    tokens: int | None = None
    requests: int | None = None


@dataclass(frozen=True)
class AlertConfig:
    """Where a policy's budget alerts go; the webhook URL is a secret (never logged)."""

    webhook: str = field(repr=False)
    format: Literal["slack", "discord"] = "slack"


@dataclass(frozen=True)
class Policy:
    """A named budget policy from `policies/*.yaml`."""

    name: str
    match: PolicyMatch
    budgets: tuple[BudgetLimit, ...]
    timezone: str = "UTC"
    warn_at: tuple[Decimal, ...] = (Decimal("0.7"), Decimal("0.9"), Decimal("0.95"))
    on_exceed: Literal["block", "downgrade"] = "block"
    downgrade_to: str | None = None
    max_output_tokens: int | None = None     # overrides the model's cap for the reservation
    source: str = ""                         # file the policy came from
    alerts: AlertConfig | None = None        # webhook for warn_at and exceeded alerts


@dataclass(frozen=True)
class RetryConfig:
    """Retries within one provider (tenacity)."""

    max_retries: int = 2
    statuses: tuple[int, ...] = (429, 500, 502, 503, 504)
    backoff_base_s: float = 0.25
    backoff_cap_s: float = 8.0
    retry_after_cap_s: float = 30.0
    deadline_s: float = 60.0                 # whole request across attempts and providers
    budget_ratio: float = 0.2                # retries at most this share of requests in flight ...
    budget_floor: int = 3                    # ... plus this many


@dataclass(frozen=True)
class BreakerConfig:
    """Circuit breaker per provider."""

    window_s: float = 30.0
    min_calls: int = 10
    failure_rate: float = 0.5
    consecutive_failures: int = 5
    open_s: float = 15.0
    open_max_s: float = 300.0
    half_open_probes: int = 1


@dataclass(frozen=True)
class Settings:
    """The whole validated configuration; swapped as one reference on reload."""

    server: ServerConfig
    store: StoreConfig
    providers: dict[str, ProviderConfig]
    routes: tuple[Route, ...]
    pricing: dict[str, ModelPrice]
    keys: tuple[ApiKey, ...] = ()
    policies: tuple[Policy, ...] = ()
    retry: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()
    source_files: tuple[str, ...] = ()       # every file read, for the reload watcher

    @cached_property
    def key_index(self) -> dict[str, ApiKey]:
        """Client keys by digest."""
        return {key.sha256: key for key in self.keys}

    def route_for(self, model: str) -> Route | None:
        """The route serving `model`: an exact name wins over globs, then globs in file order."""
        for route in self.routes:
            if route.pattern == model:
                return route
        for route in self.routes:
            if route.matches(model):
                return route
        return None

    def price_for(self, model: str) -> ModelPrice | None:
        """The price of `model` (an upstream or client model name)."""
        return self.pricing.get(model)
