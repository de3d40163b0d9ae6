"""The frozen, typed configuration the gateway runs on: every key declared once, with its type, default and rule.

A key is one field here. Its type and constraints validate `config.yaml`, the pricing and policy files
(`gateway.config.loader`), and make the published JSON Schema (`gateway schema`). Rules that look across
sections or files (routes -> providers, prices, what a policy can match) are in `gateway.config.checks`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Callable, Mapping
from decimal import Decimal
from functools import cached_property
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import AfterValidator, BeforeValidator, Field, GetJsonSchemaHandler, TypeAdapter, ValidationError
from pydantic import ValidationInfo, model_validator
from pydantic.dataclasses import dataclass
from pydantic.json_schema import JsonSchemaValue, SkipJsonSchema
from pydantic_core import CoreSchema

from gateway.config.base import STRICT, Problems, again, checked, file_context, file_form, problem, read_as
from gateway.config.digest import key_digest
from gateway.config.fields import (
    Count, Fraction, HttpUrl, Money, Name, Path, RedisUrl, Seconds, Sha256, Share, TimeZone, Webhook,
)
from gateway.config.hosts import is_loopback
from gateway.config.routes import Route, RouteForm, RouteTarget, routes_of

__all__ = [
    "ServerConfig", "StoreConfig", "CacheConfig", "ProviderTimeouts", "ProviderConfig", "RouteTarget", "Route",
    "ModelPrice", "CallerIdentity", "ApiKey", "PolicyMatch", "BudgetLimit", "RateLimit", "AlertConfig", "Downgrade",
    "Policy",
    "PolicyList", "PricingFile", "RetryConfig", "BreakerConfig", "Providers", "Routes", "Keys", "Settings",
    "LOCAL_CALLER", "ADMIN_CALLER", "Api", "DEFAULT_APIS", "IMAGE_TOKENS",
]

Handler = Callable[[Any], Any]
Api = Literal["openai-chat", "openai-responses", "anthropic-messages"]
"""A wire API a provider serves: OpenAI's chat/completions/embeddings, OpenAI's Responses, Anthropic's Messages."""
DEFAULT_APIS: tuple[Api, ...] = ("openai-chat",)
_PLAINTEXT_KEYS = {"admin_key": "admin_key_sha256", "metrics_key": "metrics_key_sha256"}


@dataclass(frozen=True, config=STRICT)
class ServerConfig:
    """How the gateway listens and talks to clients."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_body_bytes: Count = 4 * 1024 * 1024
    client_timeout_s: Seconds = 60.0
    """How long a client may take to send its request body."""
    header_timeout_s: Seconds = 10.0
    """How long a client may take to send its request line and headers."""
    keepalive_timeout_s: Seconds = 75.0
    """An idle kept-alive client connection is closed after this."""
    max_connections: Count = 4096
    """Open client connections (lowered to what the open-file limit allows)."""
    shutdown_grace_s: Share = 30.0
    """On SIGTERM, how long requests in flight may take to finish."""
    auth: Literal["keys", "none"] = "keys"
    """`none` only on a loopback host."""
    admin_key_sha256: Sha256 | None = None
    """The admin key's digest; or `admin_key`, its plaintext (from the environment)."""
    metrics_key_sha256: Sha256 | None = None
    """Set: GET /metrics needs this bearer key; or `metrics_key`, its plaintext."""
    access_log: bool = True

    @model_validator(mode="wrap")
    @classmethod
    def _from_file(cls, data: Any, handler: Handler, info: ValidationInfo) -> Any:
        """In a file a key may be given as plaintext (`admin_key`), kept only as its digest."""
        fields, problems = file_form(data, info, ())
        if fields is None:
            return handler(data)
        for plain, digest in _PLAINTEXT_KEYS.items():
            text = fields.pop(plain, None)
            if text is not None and not isinstance(text, str):
                problems.append(problem((plain,), "must be a string"))
            elif text and fields.get(digest) is not None:
                problems.append(problem((plain,), f"set {plain} or {digest}, not both"))
            elif text:
                fields[digest] = key_digest(text)
        return checked(handler, fields, problems)

    @model_validator(mode="after")
    def _auth_none_on_loopback(self) -> Self:
        """No client keys only where no other machine can reach the gateway."""
        if self.auth == "none" and not is_loopback(self.host):
            raise _at(("auth",), "'none' is only allowed when server.host is a loopback address "
                                 "(127.0.0.0/8, ::1, localhost)")
        return self

    @staticmethod
    def __get_pydantic_json_schema__(schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """The plaintext spellings of the two keys, beside their digests."""
        json_schema = handler(schema)
        own = handler.resolve_ref_schema(json_schema)
        for plain, digest in _PLAINTEXT_KEYS.items():
            own["properties"][plain] = {"type": "string", "description": f"plaintext of {digest}, kept only as "
                                                                        "its SHA-256 (use ${VAR})"}
        return json_schema


@dataclass(frozen=True, config=STRICT)
class StoreConfig:
    """Where budget counters live: Redis when `url` is set, else the embedded SQLite file at `path`."""

    url: RedisUrl = None
    """redis://, rediss://, redis+cluster://, redis+sentinel://; empty: the embedded store."""
    path: Path = "./data/gateway.db"
    timeout_s: Seconds = 0.25
    """Socket connect/read timeout for each store call."""
    pool_size: Count = 64
    on_outage: Literal["fail_closed", "fail_open"] = "fail_closed"
    fail_open_allowance: Decimal = Field(default=Decimal("0.01"), ge=0, le=1)
    """Share of each limit one replica may spend blind."""
    lease_s: Seconds = 900.0
    """A reservation not settled by then turns into spend."""
    reserve_ahead: bool = True
    """Keep a spare reservation for the next request (budget/spares.py)."""
    reserve_ahead_idle_s: Seconds = 1.0
    """A spare not taken by then is released."""
    journal_path: Path = "./data/journal.jsonl"
    ledger_max_entries: Count = 1_000_000
    """Spend ledger rows kept (the oldest are trimmed)."""


@dataclass(frozen=True, config=STRICT)
class CacheConfig:
    """The response cache: identical requests for the models listed are answered once, within a scope."""

    ttl_s: Seconds = 3600.0
    """How long an answer is served from the cache."""
    scope: Literal["key", "team", "global"] = "team"
    """Whose requests may share an answer; a key without a team shares only its own under `team`."""
    models: tuple[str, ...] = ()
    """Client model names or globs whose answers are cached (default: none)."""
    max_entry_bytes: Count = 1024 * 1024
    """A larger answer is not cached."""
    max_bytes: Count = 256 * 1024 * 1024
    """Embedded store only: past this, the least recently used answers are dropped."""

    @model_validator(mode="after")
    def _entry_fits(self) -> Self:
        """One answer must fit in the embedded store."""
        if self.max_entry_bytes > self.max_bytes:
            raise _at(("max_entry_bytes",), "must be <= max_bytes")
        return self

    def caches(self, model: str) -> bool:
        """True when answers for the client model `model` are cached."""
        return any(model == glob or fnmatch.fnmatchcase(model, glob) for glob in self.models)


@dataclass(frozen=True, config=STRICT)
class ProviderTimeouts:
    """aiohttp client timeouts for one provider, in seconds."""

    connect_s: Seconds = 5.0
    read_s: Seconds = 120.0
    """Between two reads (a stalled stream)."""
    total_s: Seconds = 600.0
    stream_s: Seconds = 600.0
    """Relaying one stream, from its response head (see README)."""


@dataclass(frozen=True, config=STRICT)
class ProviderConfig:
    """An upstream serving the wire APIs in `apis`. `api_key` comes from the environment; never log it."""

    base_url: HttpUrl
    """Ends before /chat/completions, e.g. https://api.openai.com/v1."""
    api_key: str = Field(default="", repr=False)
    headers: Annotated[tuple[tuple[str, str], ...], read_as(dict[str, str], lambda m: tuple(m.items()))] = ()
    """Sent with every call; values are kept as secret as api_key."""
    timeouts: ProviderTimeouts = ProviderTimeouts()
    max_connections: Count = 256
    max_response_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    """A larger non-streamed answer is a 502; below 1024 even a short answer would be refused."""
    rate_limits: RateLimits = ()
    """The provider's own quota across all replicas: at its limit it is skipped, like an open breaker."""
    apis: Annotated[tuple[Api, ...], Field(min_length=1)] = DEFAULT_APIS
    """The wire APIs it serves; an endpoint is routed only to providers that serve its API (default: openai-chat,
    i.e. /chat/completions, /completions and /embeddings; /responses only when listed)."""
    name: SkipJsonSchema[str] = Field(default="", kw_only=True)
    """Its key under `providers`."""

    @model_validator(mode="wrap")
    @classmethod
    def _from_file(cls, data: Any, handler: Handler, info: ValidationInfo) -> Any:
        """In a file the name is the provider's key under `providers`."""
        fields, problems = file_form(data, info, ("name",))
        return handler(data) if fields is None else checked(handler, fields, problems)


IMAGE_TOKENS = 2_000
"""A price's default `image_tokens`: above what most models bill for one image (OpenAI's tiles: at most 1,445;
Anthropic: about 1,600), not all (gpt-4o-mini: up to 48,169; the patch-counted minis: up to 3,779)."""


@dataclass(frozen=True, config=STRICT)
class ModelPrice:
    """USD per 1M tokens, exact Decimals as written in the pricing file."""

    input: Money
    output: Money
    cached_input: Money | None = None
    """None: cached tokens cost the input price."""
    max_output_tokens: int = Field(default=4096, ge=0)
    """Worst case reserved when a request has no max_tokens."""
    cache_write: Money | None = None
    """Prompt tokens written to a provider's prompt cache (Anthropic's cache_creation_input_tokens); None: the
    input price."""
    cache_write_1h: Money | None = None
    """Prompt tokens written to a provider's prompt cache for an hour (Anthropic's `cache_control.ttl: 1h`);
    None: twice the input price (Anthropic's rate)."""
    image_tokens: int = Field(default=IMAGE_TOKENS, ge=0)
    """The most input tokens one image may cost on this model: reserved for each image a request sends."""

    @cached_property
    def whole_nano_per_token(self) -> tuple[int, int, int, int, int] | None:
        """(input, cached input, output, cache write, 1-hour cache write) in nano-USD per token when all five are
        whole numbers."""
        rates = [rate * 1000 for rate in (self.input, self.cached_rate, self.output, self.cache_write_rate,
                                          self.cache_write_1h_rate)]
        if any(rate != rate.to_integral_value() for rate in rates):   # (USD/1M tokens -> nano-USD/token)
            return None
        return int(rates[0]), int(rates[1]), int(rates[2]), int(rates[3]), int(rates[4])

    @property
    def cached_rate(self) -> Decimal:
        """USD per 1M cached prompt tokens (cache reads)."""
        return self.input if self.cached_input is None else self.cached_input

    @property
    def cache_write_rate(self) -> Decimal:
        """USD per 1M prompt tokens written to the provider's cache."""
        return self.input if self.cache_write is None else self.cache_write

    @property
    def cache_write_1h_rate(self) -> Decimal:
        """USD per 1M prompt tokens written to the provider's cache for an hour."""
        return 2 * self.input if self.cache_write_1h is None else self.cache_write_1h


@dataclass(frozen=True, config=STRICT)
class CallerIdentity:
    """Who is calling: what policies match on and what the access log names."""

    name: Name
    team: str | None = None
    tags: tuple[str, ...] = ()
    admin: bool = False


LOCAL_CALLER = CallerIdentity(name="local")
"""A request without a known key, under `auth: none`."""
ADMIN_CALLER = CallerIdentity(name="admin", admin=True)
"""A request with the admin key."""


@dataclass(frozen=True, config=STRICT)
class ApiKey:
    """A client key known only by its SHA-256 hex digest; in a file `{name, team, tags, admin, sha256 | key_env}`."""

    sha256: Sha256 = Field(repr=False)
    identity: CallerIdentity = CallerIdentity(name="anonymous")

    @model_validator(mode="wrap")
    @classmethod
    def _from_file(cls, data: Any, handler: Handler, info: ValidationInfo) -> Any:
        """The identity's keys sit beside the key's; the key is its digest or a variable holding its plaintext."""
        context = file_context(info)
        if context is None or not isinstance(data, dict):
            return handler(data)
        identity = dict(data)
        digest, problems = _digest(identity.pop("sha256", None), identity.pop("key_env", None), context.env)
        return checked(handler, {"sha256": digest, "identity": identity}, problems, inline="identity")

    @staticmethod
    def __get_pydantic_json_schema__(schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """The identity's properties beside `sha256` or `key_env`."""
        json_schema = handler(schema)
        own = handler.resolve_ref_schema(json_schema)
        identity = handler.resolve_ref_schema(own["properties"].pop("identity"))
        key_env = {"type": "string", "description": "environment variable holding the plaintext key (hashed at load)"}
        own["properties"] = {**identity["properties"], **own["properties"], "key_env": key_env}
        own["required"] = identity["required"]
        own["oneOf"] = [{"required": ["sha256"]}, {"required": ["key_env"]}]
        return json_schema


def _digest(sha256: Any, key_env: Any, env: Mapping[str, str]) -> tuple[Any, Problems]:
    """The key's digest as written, or of the plaintext in `key_env`; a stand-in (never kept) when neither works."""
    stand_in = "0" * 64
    if (sha256 is None) == (key_env is None):
        return stand_in, [problem((), "needs exactly one of sha256 or key_env")]
    if key_env is None:
        return sha256, []
    if not isinstance(key_env, str):
        return stand_in, [problem(("key_env",), "must be a string")]
    secret = env.get(key_env)
    if not secret:
        return stand_in, [problem(("key_env",), f"environment variable {key_env} is "
                                  + ("empty" if secret == "" else "not set"))]
    return key_digest(secret), []


@dataclass(frozen=True, config=STRICT)
class PolicyMatch:
    """Which requests a policy applies to; every non-empty field must match, all empty = every request."""

    keys: tuple[str, ...] = ()
    """Caller names."""
    teams: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    """Globs on the client's model name."""


@dataclass(frozen=True, config=STRICT)
class BudgetLimit:
    """Limits for one calendar period; None means that unit is not limited."""

    period: Literal["daily", "monthly"]
    usd: Money | None = None
    tokens: int | None = Field(default=None, ge=0)
    requests: int | None = Field(default=None, ge=0)

    @model_validator(mode="wrap")
    @classmethod
    def _limits_something(cls, data: Any, handler: Handler) -> Any:
        """A budget without a limit would limit nothing (said beside any other mistake in it)."""
        if isinstance(data, dict):
            limited = any(data.get(unit) is not None for unit in _UNITS)
            return checked(handler, data, [] if limited else [problem((), _NO_LIMIT)])
        budget = handler(data)
        if all(getattr(budget, unit) is None for unit in _UNITS):
            raise ValueError(_NO_LIMIT)
        return budget


_UNITS = ("usd", "tokens", "requests")
_NO_LIMIT = "needs at least one limit: usd, tokens or requests"


_Item = TypeVar("_Item")


def _no_two_alike(items: tuple[_Item, ...], field: str, says: Callable[[str, int], str]) -> tuple[_Item, ...]:
    """The items, when no two share a value of `field`; else each repeat's problem, `says(value, first index)`."""
    first: dict[str, int] = {}
    problems = []
    for index, item in enumerate(items):
        value = getattr(item, field)
        if value in first:
            problems.append(problem((index, field), says(value, first[value])))
        first.setdefault(value, index)
    if problems:
        raise ValidationError.from_exception_data("config", problems)
    return items


def _one_per_period(budgets: tuple[BudgetLimit, ...]) -> tuple[BudgetLimit, ...]:
    """The budgets, when no two are for the same period."""
    return _no_two_alike(budgets, "period", lambda period, at: f"{period} budget already set at budgets[{at}]")


@dataclass(frozen=True, config=STRICT)
class RateLimit:
    """Requests and/or tokens admitted in any sliding window of one second, minute or hour."""

    per: Literal["second", "minute", "hour"]
    requests: int | None = Field(default=None, ge=1)
    tokens: int | None = Field(default=None, ge=1)
    """Tokens a request may use (its worst case is held until it settles to the real count)."""

    @model_validator(mode="wrap")
    @classmethod
    def _limits_something(cls, data: Any, handler: Handler) -> Any:
        """A rate limit without requests or tokens would limit nothing."""
        if isinstance(data, dict):
            limited = any(data.get(unit) is not None for unit in ("requests", "tokens"))
            return checked(handler, data, [] if limited else [problem((), _NO_RATE)])
        limit = handler(data)
        if limit.requests is None and limit.tokens is None:
            raise ValueError(_NO_RATE)
        return limit


_NO_RATE = "needs at least one limit: requests or tokens"


def _one_per_window(limits: tuple[RateLimit, ...]) -> tuple[RateLimit, ...]:
    """The rate limits, when no two are for the same window."""
    return _no_two_alike(limits, "per", lambda per, at: f"a per-{per} limit is already set at rate_limits[{at}]")


RateLimits = Annotated[tuple[RateLimit, ...], AfterValidator(_one_per_window)]


@dataclass(frozen=True, config=STRICT)
class AlertConfig:
    """Where a policy's budget alerts go; the webhook URL is a secret (never logged)."""

    webhook: Webhook = Field(repr=False)
    format: Literal["slack", "discord"] = "slack"


@dataclass(frozen=True, config=STRICT)
class Downgrade:
    """`on_exceed: {downgrade: <model>}`: over budget, serve this cheaper model instead of refusing."""

    downgrade: str


@dataclass(frozen=True, config=STRICT)
class Policy:
    """A named budget policy from `policies/*.yaml`."""

    name: Name
    match: PolicyMatch = PolicyMatch()
    budgets: Annotated[tuple[BudgetLimit, ...], AfterValidator(_one_per_period)] = Field(default=(), kw_only=True)
    each: Literal["key", "team", "model", "user"] | None = None
    """Budgets, rate limits and max_concurrent apply to each key, team, model or end user apart; absent: shared."""
    without_user: Literal["refuse", "anonymous"] = "refuse"
    """`each: user`: a request without an end user gets a 400 (`refuse`) or counts as the user `anonymous`."""
    rate_limits: RateLimits = ()
    max_concurrent: int | None = Field(default=None, ge=1)
    """Requests in flight at once (per `each` value)."""
    timezone: TimeZone = "UTC"
    warn_at: Annotated[tuple[Fraction, ...], AfterValidator(lambda shares: tuple(sorted(set(shares))))] = (
        Decimal("0.7"), Decimal("0.9"), Decimal("0.95"))
    """Spent shares that trigger a warning."""
    on_exceed: Annotated[Literal["block", "downgrade"],
                         BeforeValidator(lambda value: value, json_schema_input_type=Literal["block"] | Downgrade)
                         ] = "block"
    downgrade_to: SkipJsonSchema[str | None] = None
    """From `on_exceed: {downgrade: <model>}`."""
    max_output_tokens: int | None = Field(default=None, ge=1)
    """Overrides the model's cap for the reservation."""
    source: SkipJsonSchema[str] = ""
    """The file the policy came from."""
    alerts: AlertConfig | None = None
    """Webhook for warn_at and exceeded alerts."""
    forecast_alert: Decimal | None = Field(default=None, gt=0, le=10)
    """Alert (by `alerts.webhook`, once per window) when the projected spend at the reset passes this share of
    the limit."""

    @model_validator(mode="after")
    def _limits_something(self) -> Self:
        """A policy without budgets, rate limits or max_concurrent would limit nothing."""
        if not self.budgets and not self.rate_limits and self.max_concurrent is None:
            raise _at((), "needs at least one of: budgets, rate_limits, max_concurrent")
        if self.forecast_alert is not None and (self.alerts is None or not self.budgets):
            raise _at(("forecast_alert",), "needs budgets and alerts.webhook to send it to")
        return self

    @property
    def limits_rate(self) -> bool:
        """True when the policy has rate limits or a max_concurrent."""
        return bool(self.rate_limits) or self.max_concurrent is not None

    @model_validator(mode="wrap")
    @classmethod
    def _from_file(cls, data: Any, handler: Handler, info: ValidationInfo) -> Any:
        """`on_exceed` is `block` or `{downgrade: <model>}`; the loader sets where the policy came from."""
        fields, problems = file_form(data, info, ("downgrade_to", "source"))
        if fields is None:
            return handler(data)
        choice = fields.pop("on_exceed", "block")
        if isinstance(choice, dict):
            try:
                fields |= {"on_exceed": "downgrade", "downgrade_to": _DOWNGRADE.validate_python(choice).downgrade}
            except ValidationError as exc:
                problems += [again(error, ("on_exceed", *error["loc"])) for error in exc.errors()]
        elif choice != "block":
            problems.append(problem(("on_exceed",), "must be 'block' or a mapping {downgrade: <model>}"))
        return checked(handler, fields, problems)


_DOWNGRADE = TypeAdapter(Downgrade)


@dataclass(frozen=True, config=STRICT)
class PolicyList:
    """A policy file holding several policies."""

    policies: tuple[Policy, ...] = Field(min_length=1)


@dataclass(frozen=True, config=STRICT)
class PricingFile:
    """A pricing file: model name -> price."""

    models: dict[str, ModelPrice]


@dataclass(frozen=True, config=STRICT)
class RetryConfig:
    """Retries within one provider (tenacity)."""

    max_retries: int = Field(default=2, ge=0)
    statuses: tuple[Annotated[int, Field(ge=100, le=599)], ...] = (429, 500, 502, 503, 504)
    backoff_base_s: Share = 0.25
    backoff_cap_s: Share = 8.0
    retry_after_cap_s: Share = 30.0
    """A longer Retry-After fails over instead of waiting."""
    deadline_s: Seconds = 60.0
    """Whole request across attempts and providers."""
    budget_ratio: Share = 0.2
    """Retries at most this share of requests in flight ..."""
    budget_floor: int = Field(default=3, ge=0)
    """... plus this many."""


@dataclass(frozen=True, config=STRICT)
class BreakerConfig:
    """Circuit breaker per provider."""

    window_s: Seconds = 30.0
    min_calls: Count = 10
    failure_rate: float = Field(default=0.5, gt=0, le=1)
    consecutive_failures: Count = 5
    open_s: Seconds = 15.0
    """First open period, doubling up to open_max_s."""
    open_max_s: Seconds = 300.0
    half_open_probes: Count = 1

    @model_validator(mode="after")
    def _open_max_after_open(self) -> Self:
        """The open period only grows."""
        if self.open_max_s < self.open_s:
            raise _at(("open_max_s",), "must be >= open_s")
        return self


def _named(providers: dict[str, ProviderConfig]) -> dict[str, ProviderConfig]:
    """Each provider named by its key."""
    return {name: _with_name(provider, name) for name, provider in providers.items()}


def _with_name(provider: ProviderConfig, name: str) -> ProviderConfig:
    """`provider` named `name`."""
    return provider if provider.name == name else dataclasses.replace(provider, name=name)


Providers = Annotated[dict[str, ProviderConfig], read_as(dict[str, ProviderConfig], _named)]
Routes = Annotated[tuple[Route, ...], read_as(dict[str, RouteForm], routes_of)]
Keys = tuple[ApiKey, ...]


@dataclass(frozen=True, config=STRICT)
class Settings:
    """The whole validated configuration; swapped as one reference on reload."""

    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    providers: Providers = Field(kw_only=True)
    """By name."""
    routes: Routes = Field(kw_only=True)
    """Client model name (or glob) -> providers, primary first; or a split, canary or rules."""
    pricing: Annotated[dict[str, ModelPrice],
                       BeforeValidator(lambda value: value, json_schema_input_type=str | dict[str, ModelPrice])
                       ] = Field(kw_only=True)
    """A pricing file (its `models`), or the prices inline."""
    keys: Keys = ()
    policies: Annotated[tuple[Policy, ...],
                        BeforeValidator(lambda value: value, json_schema_input_type=str | list[str])] = ()
    """A directory (every *.yaml) or a list of policy files."""
    retry: RetryConfig = RetryConfig()
    breaker: BreakerConfig = BreakerConfig()
    cache: CacheConfig = CacheConfig()
    source_files: SkipJsonSchema[tuple[str, ...]] = ()
    """Every file read, for the reload watcher."""

    @model_validator(mode="wrap")
    @classmethod
    def _from_file(cls, data: Any, handler: Handler, info: ValidationInfo) -> Any:
        """Sections left out are read as empty, so their defaults are taken as from this file (paths beside it)."""
        fields, problems = file_form(data, info, ("source_files",))
        if fields is None:
            return handler(data)
        for section in ("server", "store"):
            fields.setdefault(section, {})
        return checked(handler, fields, problems)

    @cached_property
    def key_index(self) -> dict[str, ApiKey]:
        """Client keys by digest."""
        return {key.sha256: key for key in self.keys}

    @cached_property
    def policy_index(self) -> dict[str, Policy]:
        """Policies by name."""
        return {policy.name: policy for policy in self.policies}

    def route_for(self, model: str) -> Route | None:
        """The route serving `model`: an exact name wins over globs, then globs in file order."""
        for route in self.routes:
            if route.pattern == model:
                return route
        for route in self.routes:
            if route.matches(model):
                return route
        return None


def _at(loc: tuple[str | int, ...], message: str) -> ValidationError:
    """A problem at `loc` of the value being validated, to raise."""
    return ValidationError.from_exception_data("config", [problem(loc, message)])
