"""The metrics the gateway keeps in process, and the observer methods that update them.

Request metrics come from each request's access record; upstream attempts, retries, failovers and
breaker transitions from the resilience registry's callbacks; store timings from the instrumented
store. Label values go through `LabelBounds` of the config active at observe time.
"""

from __future__ import annotations

import time
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from gateway.budget.instrumented import TIMED_OPERATIONS
from gateway.cache.service import ResponseCache
from gateway.config.holder import ConfigHolder
from gateway.errors import BudgetExceeded, RateLimited
from gateway.observability.access_log import AccessRecord
from gateway.observability.cache import CacheMetrics
from gateway.observability.histograms import HistogramChild, LoopHistogram
from gateway.observability.labels import NONE, LabelBounds, status_class
from gateway.observability.served import ServedCollector, ServedKey, ServedTotals
from gateway.resilience.breaker import Transition
from gateway.resilience.registry import ResilienceRegistry

__all__ = ["GatewayMetrics", "Children", "CONTROL_PATHS"]

REQUEST_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

MAX_SERVED_KINDS = 4096
CONTROL_PATHS = frozenset({"/metrics", "/healthz", "/readyz", "/v1/providers/status", "/v1/budget/status", "/ui",
                           "/v1/budget/usage"})
"""Scrapes, health checks and status reads: counted in `gateway_control_requests_total`, not as traffic."""
M = TypeVar("M", Counter, LoopHistogram)


class Children(Generic[M]):
    """One labelled metric's children, bound once per label tuple (the hot path skips `labels()`)."""

    def __init__(self, metric: M) -> None:
        self.metric: M = metric
        self._bound: dict[tuple[str, ...], Any] = {}   # the metric's children

    def __call__(self, *values: str) -> Any:
        child = self._bound.get(values)
        if child is None:
            child = self._bound[values] = self.metric.labels(*values)
        return child


class _Served:
    """What one kind of answer (route, model, provider, status class, policies) updates."""

    __slots__ = ("totals", "duration", "first_token")

    def __init__(self, totals: ServedTotals, duration: HistogramChild, first_token: HistogramChild) -> None:
        self.totals, self.duration, self.first_token = totals, duration, first_token


class GatewayMetrics:
    """Every in-process gateway metric, registered on `registry`; budgets and breaker states are read at scrape."""

    def __init__(self, registry: CollectorRegistry, config: ConfigHolder) -> None:
        self.registry = registry
        self._config = config
        self._bounds = LabelBounds(config.current)
        self._served: dict[tuple[str | None, str | None, str | None, int, tuple[str, ...]], _Served] = {}
        self._totals: dict[ServedKey, ServedTotals] = {}
        self._upstream: dict[str, HistogramChild] = {}   # upstream duration children by provider name
        registry.register(ServedCollector(self._totals))
        self.request_duration = Children(LoopHistogram(
            "gateway_request_duration_seconds", "Whole request time on the gateway side.",
            ("route", "provider"), buckets=REQUEST_BUCKETS, registry=registry))
        self.upstream_duration = Children(LoopHistogram(
            "gateway_upstream_duration_seconds", "Time to the upstream response head, per attempt.",
            ("provider",), buckets=REQUEST_BUCKETS, registry=registry))
        self.first_token = Children(LoopHistogram(
            "gateway_time_to_first_token_seconds", "Streams: time from arrival to the first relayed event.",
            ("route", "provider"), buckets=FIRST_TOKEN_BUCKETS, registry=registry))
        self.control = Children(Counter(
            "gateway_control_requests_total", "Scrapes, health checks and status reads, by path and status class "
            "(not in gateway_requests_total).", ("path", "status_class"), registry=registry))
        self.requests_in_flight = 0          # kept by the request middleware, read at scrape
        Gauge("gateway_requests_in_flight", "Requests being served.",
              registry=registry).set_function(lambda: self.requests_in_flight)
        self._define_spend(registry)
        self._define_resilience(registry)
        self._define_store(registry)
        self.cache = CacheMetrics(registry)

    def _define_spend(self, registry: CollectorRegistry) -> None:
        self.refusals = Children(Counter(
            "gateway_budget_refusals_total", "Requests refused by a budget, by refusing policy and period.",
            ("policy", "period"), registry=registry))
        self.rate_refusals = Children(Counter(
            "gateway_rate_limit_refusals_total", "Requests refused by a rate limit or max_concurrent, by refusing "
            "policy (or provider, when every provider was at its own limit) and kind (requests, tokens, concurrent).",
            ("policy", "kind"), registry=registry))
        self.provider_rate_skips = Children(Counter(
            "gateway_provider_rate_limited_total", "Requests that skipped a provider at its own rate limit.",
            ("provider",), registry=registry))
        self.usage_unknown = Children(Counter(
            "gateway_usage_unknown_total", "Answers charged on the gateway's bound instead of the upstream's usage, "
            "by provider and reason (missing, unreadable, over_reserved).", ("provider", "reason"), registry=registry))

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
        self.store_duration = Children(LoopHistogram(
            "gateway_store_operation_duration_seconds", "Budget store operation time.",
            ("operation",), buckets=STORE_BUCKETS, registry=registry))
        self.store_errors = Children(Counter(
            "gateway_store_errors_total", "Budget store operations that failed.", ("operation",), registry=registry))
        for operation in TIMED_OPERATIONS:
            self.store_errors(operation)

    @property
    def bounds(self) -> LabelBounds:
        """Label bounds of the active config (rebuilt after a reload)."""
        self._follow_config()
        return self._bounds

    def _follow_config(self) -> None:
        settings = self._config.current
        if self._bounds.settings is not settings:
            self._bounds = LabelBounds(settings)
            self._served, self._upstream = {}, {}   # bound by the old config's labels; the totals stay

    def follow(self, resilience: ResilienceRegistry) -> None:
        """Subscribe to the resilience registry's attempt, retry, failover and transition callbacks."""
        resilience.on_attempt.append(self.upstream_attempted)
        resilience.on_retry.append(self.retried)
        resilience.on_failover.append(self.failed_over)
        resilience.on_transition.append(self.breaker_transitioned)

    def follow_cache(self, cache: ResponseCache) -> None:
        """Subscribe to the response cache's storage failures."""
        cache.on_store_error.append(self.cache.store_failed)

    def request_served(self, record: AccessRecord, refusal: BudgetExceeded | RateLimited | None = None) -> None:
        """Count one answered request from its access record (and the budget or rate refusal it got, if any)."""
        if record.path in CONTROL_PATHS:
            self.control(record.path, status_class(record.status)).inc()
            return
        if refusal is not None:
            self.refused(refusal)
        if record.rate_skipped:
            self.providers_rate_limited(record.rate_skipped)
        self._follow_config()
        key = (record.route, record.model, record.provider, record.status, record.policies)
        served = self._served.get(key)
        if served is None:
            served = self._bind_served(key)
        served.duration.observe(time.perf_counter() - record.started)
        if record.stream and record.first_byte_s is not None:
            served.first_token.observe(record.first_byte_s)
        totals = served.totals
        totals.requests += 1
        usage = record.usage
        if usage is not None:
            totals.charged = True
            totals.prompt_tokens += usage.prompt_tokens
            totals.completion_tokens += usage.completion_tokens
            totals.cached_tokens += usage.cached_tokens
        if record.cost_nano is not None:
            totals.charged = True
            totals.cost_nano += record.cost_nano
        if record.usage_unknown is not None:
            self.usage_unknown(self.bounds.provider(record.provider), record.usage_unknown).inc()
        if record.cache is not None:
            self.cache.request_served(record, self.bounds)

    def _bind_served(self, key: tuple[str | None, str | None, str | None, int, tuple[str, ...]]) -> _Served:
        """The totals and histograms of one kind of answer (found by its raw values), under bounded labels."""
        if len(self._served) >= MAX_SERVED_KINDS:   # raw model names come from clients: keep the cache bounded
            self._served = {}
        route, model, provider, status, policies = key
        bounds = self.bounds
        route, provider = bounds.route(route), bounds.provider(provider)
        labels = (route, bounds.model(model), provider, status_class(status),
                  tuple(bounds.policy(policy) for policy in policies))
        served = self._served[key] = _Served(self._totals.setdefault(labels, ServedTotals()),
                                             self.request_duration(route, provider), self.first_token(route, provider))
        return served

    def refused(self, error: BudgetExceeded | RateLimited) -> None:
        """Count a request a budget or a rate limit refused."""
        if isinstance(error, RateLimited):
            bounds = self.bounds
            name = bounds.policy(error.policy) if error.provider is None else f"provider:{bounds.provider(error.provider)}"
            self.rate_refusals(name, error.kind).inc()
        else:
            self.refusals(self.bounds.policy(error.policy), error.period or NONE).inc()

    def providers_rate_limited(self, providers: tuple[str, ...]) -> None:
        """Count the providers a request skipped at their own rate limit."""
        for provider in providers:
            self.provider_rate_skips(self.bounds.provider(provider)).inc()

    def upstream_attempted(self, provider: str, seconds: float, outcome: str) -> None:
        """Time one upstream call to its response head (`outcome` is not a label)."""
        self._follow_config()
        child = self._upstream.get(provider)
        if child is None:
            child = self._upstream[provider] = self.upstream_duration(self.bounds.provider(provider))
        child.observe(seconds)

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
