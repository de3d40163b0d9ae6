"""The metrics the gateway keeps in process, and the observer methods that update them.

Request metrics come from each request's access record; upstream attempts, retries, failovers and
breaker transitions from the resilience registry's callbacks; store timings from the instrumented
store. Label values go through `LabelBounds` of the config active at observe time.
"""

from __future__ import annotations

import time
from typing import Generic, NamedTuple, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.access_log import AccessRecord
from gateway.budget.instrumented import TIMED_OPERATIONS
from gateway.config.holder import ConfigHolder
from gateway.errors import BudgetExceeded
from gateway.metrics.labels import NONE, LabelBounds, status_class
from gateway.resilience.breaker import Transition
from gateway.resilience.registry import ResilienceRegistry

__all__ = ["GatewayMetrics", "Children"]

REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
NANO_PER_USD = 1_000_000_000

M = TypeVar("M", Counter, Histogram)


class Children(Generic[M]):
    """One labelled metric's children, bound once per label tuple (the hot path skips `labels()`)."""

    def __init__(self, metric: M) -> None:
        self.metric = metric
        self._bound: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._bound.get(values)
        if child is None:
            child = self._bound[values] = self.metric.labels(*values)
        return child


class _Spend(NamedTuple):
    """The token and cost children of one model, provider and set of charged policies."""

    prompt_tokens: Counter
    completion_tokens: Counter
    cached_tokens: Counter
    cost: Counter
    policy_costs: tuple[Counter, ...]


class _Served:
    """The children one kind of answered request (route, model, provider, status class, policies) updates."""

    __slots__ = ("count", "duration", "spend")

    def __init__(self, count: Counter, duration: Histogram) -> None:
        self.count, self.duration = count, duration
        self.spend: _Spend | None = None      # bound when such a request is first charged


class GatewayMetrics:
    """Every in-process gateway metric, registered on `registry`; budgets and breaker states are read at scrape."""

    def __init__(self, registry: CollectorRegistry, config: ConfigHolder) -> None:
        self.registry = registry
        self._config = config
        self._bounds = LabelBounds(config.current)
        self._served: dict[tuple[str, str, str, int, tuple[str, ...]], _Served] = {}
        self.requests = Children(Counter(
            "gateway_requests_total", "Requests answered, by route pattern, model, provider and status class.",
            ("route", "model", "provider", "status_class"), registry=registry))
        self.request_duration = Children(Histogram(
            "gateway_request_duration_seconds", "Whole request time on the gateway side.",
            ("route", "provider"), buckets=REQUEST_BUCKETS, registry=registry))
        self.upstream_duration = Children(Histogram(
            "gateway_upstream_duration_seconds", "Time to the upstream response head, per attempt.",
            ("provider",), buckets=REQUEST_BUCKETS, registry=registry))
        self.first_token = Children(Histogram(
            "gateway_time_to_first_token_seconds", "Streams: time from arrival to the first relayed event.",
            ("route", "provider"), buckets=FIRST_TOKEN_BUCKETS, registry=registry))
        self.requests_in_flight = 0          # kept by the request middleware, read at scrape
        Gauge("gateway_requests_in_flight", "Requests being served.",
              registry=registry).set_function(lambda: self.requests_in_flight)
        self._define_spend(registry)
        self._define_resilience(registry)
        self._define_store(registry)

    def _define_spend(self, registry: CollectorRegistry) -> None:
        self.tokens = Children(Counter(
            "gateway_tokens_total", "Tokens charged, by model, provider and type (prompt, completion, cached).",
            ("model", "provider", "type"), registry=registry))
        self.cost = Children(Counter(
            "gateway_cost_usd_total", "USD charged, by model and provider.", ("model", "provider"), registry=registry))
        self.policy_cost = Children(Counter(
            "gateway_policy_cost_usd_total", "USD charged against each budget policy (once per policy).",
            ("policy", "model", "provider"), registry=registry))
        self.refusals = Children(Counter(
            "gateway_budget_refusals_total", "Requests refused by a budget, by refusing policy and period.",
            ("policy", "period"), registry=registry))

    def _define_resilience(self, registry: CollectorRegistry) -> None:
        self.retries = Children(Counter(
            "gateway_retries_total", "Retries within a provider, by reason (status, timeout, connect_error).",
            ("provider", "reason"), registry=registry))
        self.failovers = Children(Counter(
            "gateway_failovers_total", "Requests moved on from one provider to the next.",
            ("from_provider", "to_provider"), registry=registry))
        self.transitions = Children(Counter(
            "gateway_breaker_transitions_total", "Circuit breaker state changes.",
            ("provider", "from_state", "to_state"), registry=registry))

    def _define_store(self, registry: CollectorRegistry) -> None:
        self.store_duration = Children(Histogram(
            "gateway_store_operation_duration_seconds", "Budget store operation time.",
            ("operation",), buckets=STORE_BUCKETS, registry=registry))
        self.store_errors = Children(Counter(
            "gateway_store_errors_total", "Budget store operations that failed.", ("operation",), registry=registry))
        for operation in TIMED_OPERATIONS:
            self.store_errors(operation)

    @property
    def bounds(self) -> LabelBounds:
        """Label bounds of the active config (rebuilt after a reload)."""
        settings = self._config.current
        if self._bounds.settings is not settings:
            self._bounds = LabelBounds(settings)
            self._served = {}
        return self._bounds

    def follow(self, resilience: ResilienceRegistry) -> None:
        """Subscribe to the resilience registry's attempt, retry, failover and transition callbacks."""
        resilience.on_attempt.append(self.upstream_attempted)
        resilience.on_retry.append(self.retried)
        resilience.on_failover.append(self.failed_over)
        resilience.on_transition.append(self.breaker_transitioned)

    def request_served(self, record: AccessRecord, refusal: BudgetExceeded | None = None) -> None:
        """Count one answered request from its access record (and the budget refusal it got, if any)."""
        if refusal is not None:
            self.budget_refused(refusal)
        bounds = self.bounds
        route, provider = bounds.route(record.route), bounds.provider(record.provider)
        key = (route, bounds.model(record.model), provider, record.status // 100, record.policies)
        served = self._served.get(key)
        if served is None:
            served = self._served[key] = self._bind_served(key)
        served.count.inc()
        served.duration.observe(time.perf_counter() - record.started)
        if record.stream and record.first_byte_s is not None:
            self.first_token(route, provider).observe(record.first_byte_s)
        if record.usage is not None or record.cost_nano is not None:
            self._charged(served, key, record)

    def _bind_served(self, key: tuple[str, str, str, int, tuple[str, ...]]) -> _Served:
        route, model, provider, hundreds, _ = key
        return _Served(self.requests(route, model, provider, status_class(hundreds * 100)),
                       self.request_duration(route, provider))

    def _charged(self, served: _Served, key: tuple[str, str, str, int, tuple[str, ...]], record: AccessRecord) -> None:
        """Tokens and cost of a charged request, the cost once per charged policy."""
        spend = served.spend
        if spend is None:
            _, model, provider, _, policies = key
            spend = served.spend = _Spend(
                *(self.tokens(model, provider, kind) for kind in ("prompt", "completion", "cached")),
                self.cost(model, provider),
                tuple(self.policy_cost(self.bounds.policy(policy), model, provider) for policy in policies))
        usage = record.usage
        if usage is not None:
            spend.prompt_tokens.inc(usage.prompt_tokens)
            spend.completion_tokens.inc(usage.completion_tokens)
            spend.cached_tokens.inc(usage.cached_tokens)
        if record.cost_nano is not None:
            usd = record.cost_nano / NANO_PER_USD
            spend.cost.inc(usd)
            for policy_cost in spend.policy_costs:
                policy_cost.inc(usd)

    def budget_refused(self, error: BudgetExceeded) -> None:
        """Count a request a budget refused."""
        self.refusals(self.bounds.policy(error.policy), error.period or NONE).inc()

    def upstream_attempted(self, provider: str, seconds: float, outcome: str) -> None:
        """Time one upstream call to its response head (`outcome` is not a label)."""
        self.upstream_duration(self.bounds.provider(provider)).observe(seconds)

    def retried(self, provider: str, reason: str) -> None:
        """Count a retry within `provider`; reasons are retryable statuses, timeout or connect_error."""
        self.retries(self.bounds.provider(provider), reason).inc()

    def failed_over(self, from_provider: str, to_provider: str) -> None:
        """Count a request moving on to the next provider."""
        bounds = self.bounds
        self.failovers(bounds.provider(from_provider), bounds.provider(to_provider)).inc()

    def breaker_transitioned(self, event: Transition) -> None:
        """Count a breaker state change."""
        self.transitions(self.bounds.provider(event.provider), event.old.value, event.new.value).inc()

    def store_operation(self, operation: str, seconds: float, failed: bool) -> None:
        """Time one budget store operation; count it when it failed."""
        self.store_duration(operation).observe(seconds)
        if failed:
            self.store_errors(operation).inc()
