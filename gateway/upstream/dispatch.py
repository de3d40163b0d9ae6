"""Sending a request to the plan's providers until one answers: breaker gate, retries, failover.

For each target, in plan order:

    breaker rejects the call        -> skip to the next target, with zero calls
    provider at its own rate limit  -> skipped the same way (the budget engine reserved on the others)
    2xx or 4xx answer               -> returned unread, so nothing has reached the client yet
    retryable status, connect error -> retried under the provider's policy and retry budget,
                                       then the next target
    other 5xx (501, 505, 520-524)   -> the next target at once, without a retry
    3xx (a redirect)                -> not followed, a breaker failure: the next target at once, never
                                       retried (a redirect does not go away on retry), whatever
                                       `retry.statuses` says

Every attempt holds its own breaker permit, so a breaker that opens during the retries stops them and
the request fails over. When every target fails, `UpstreamFailure` describes the last upstream error.
A failover is reported only when a later target's breaker admits the call: from the last provider that
failed (the first target when its breaker skipped it); a target its breaker skips moves nothing.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from tenacity import RetryCallState

from gateway.config.model import ProviderConfig
from gateway.domain.plan import Plan, Target
from gateway.domain.request import ProxyRequest, upstream_body
from gateway.errors import UpstreamFailure
from gateway.resilience.breaker import BreakerState, CircuitBreaker, Permit
from gateway.resilience.registry import ResilienceRegistry
from gateway.resilience.retry import RetryableStatus, RetryBudget, UpstreamConnectError, build_retrying
from gateway.upstream.bounded import BodyTooLarge, read_bounded
from gateway.upstream.providers import ProviderPool

__all__ = ["UpstreamReply", "dispatch"]

_DEFAULT_RETRY_AFTER_S = 1.0   # told to a rate-limited client when the upstream named no wait
_TIMEOUT_SLACK_S = 2.0   # aiohttp rounds each long timeout (connect, read, total) up to a whole second
_ERROR_BODY_BYTES = 64 * 1024   # of an error answer read before a retry (used only for a 429's error object)
_UpstreamError = RetryableStatus | UpstreamConnectError


@dataclass
class UpstreamReply:
    """The upstream answer chosen to serve the client (not yet read)."""

    target: Target
    response: aiohttp.ClientResponse
    attempts: int
    provider_config: ProviderConfig          # of the client that answered (its limits bound the answer)


class _BreakerOpen(Exception):
    """The provider's breaker rejects calls: fail over, never retry."""


class _Redirected(Exception):
    """The provider answered a redirect: fail over, never retry."""


@dataclass
class _Call:
    """One client request on its way through the plan, and what has happened to it so far."""

    req: ProxyRequest
    pool: ProviderPool
    resilience: ResilienceRegistry
    deadline_at: float                       # monotonic
    attempts: int = 0
    last_provider: str | None = None
    last_error: _UpstreamError | None = None
    failover_from: str | None = None         # set on a later target: reported once its breaker admits a call
    provider_config: ProviderConfig | None = None   # of the client the last attempt was sent with

    def remaining(self) -> float:
        """Seconds left before the request's deadline."""
        return self.deadline_at - self.resilience.clock.monotonic()


class _Gate:
    """Hands out one breaker permit per attempt; the first one was taken before the first attempt."""

    def __init__(self, breaker: CircuitBreaker, first: Permit) -> None:
        self.breaker = breaker
        self._first: Permit | None = first

    def permit(self) -> Permit:
        """A permit for the next attempt; _BreakerOpen when the breaker has opened meanwhile."""
        permit, self._first = self._first or self.breaker.acquire(), None
        if permit is None:
            raise _BreakerOpen(self.breaker.name)
        return permit


async def dispatch(req: ProxyRequest, plan: Plan, pool: ProviderPool, resilience: ResilienceRegistry,
                   *, deadline_s: float, skip: frozenset[str] = frozenset()) -> UpstreamReply:
    """The first good answer from the plan's targets, in order; UpstreamFailure when none gives one.

    Providers in `skip` (at their own rate limit) are passed over like a provider whose breaker is open.
    """
    call = _Call(req, pool, resilience, resilience.clock.monotonic() + deadline_s)
    targets = plan.targets
    for index, target in enumerate(targets):
        if call.remaining() <= 0:
            break
        if target.provider in skip:
            continue
        call.failover_from = (call.last_provider or targets[0].provider) if index else None
        reply = await _try_provider(call, target)
        if reply is not None:
            return reply
    raise _all_failed(call, plan)


async def _try_provider(call: _Call, target: Target) -> UpstreamReply | None:
    """One provider under its breaker, retry policy and retry budget; None when it failed or was skipped."""
    resilience = call.resilience
    breaker = resilience.breaker(target.provider)
    first = breaker.acquire()
    if first is None:
        return None
    if call.failover_from is not None:
        resilience.failed_over(call.failover_from, target.provider)
    budget = resilience.budget(target.provider)
    gate = _Gate(breaker, first)
    budget.start()
    try:
        try:
            response = await _attempt(call, target, gate)
        except (RetryableStatus, UpstreamConnectError) as error:
            response = await _retry(call, target, gate, budget, error)
    except (_BreakerOpen, _Redirected, RetryableStatus, UpstreamConnectError):
        return None
    finally:
        first.ignore()                       # no-op once used; frees a probe slot if never used
        budget.finish()
    assert call.provider_config is not None
    return UpstreamReply(target, response, call.attempts, call.provider_config)


async def _retry(call: _Call, target: Target, gate: _Gate, budget: RetryBudget,
                 first_error: _UpstreamError) -> aiohttp.ClientResponse:
    """The retries after a failed first attempt, under the tenacity policy of `build_retrying`.

    Most requests succeed at once, so the policy is built only now. Tenacity is handed the first
    attempt's error as its own first attempt (replayed, not sent again) and so decides exactly as if it
    had made that attempt itself.
    """
    resilience = call.resilience
    retrying = build_retrying(resilience.retry, budget=budget,
                              deadline_at=call.deadline_at, clock=resilience.clock, sleep=resilience.sleep,
                              on_retry=_retry_reporter(resilience, target.provider))
    replay: list[_UpstreamError] = [first_error]

    async def attempt() -> aiohttp.ClientResponse:
        if replay:
            raise replay.pop()
        return await _attempt(call, target, gate)

    return await retrying(attempt)


async def _attempt(call: _Call, target: Target, gate: _Gate) -> aiohttp.ClientResponse:
    """One upstream call under its own permit; raises what the retry policy decides on."""
    permit = gate.permit()
    call.attempts += 1
    try:
        response = await _send(call, target)
        status = response.status
        if 200 <= status < 300:
            permit.success()
            return response
        _settle(permit, status)
        if 300 <= status < 400:
            raise _redirected(call, target, response)
        if status >= 500 or status in call.resilience.retry.statuses:
            raise await _retryable(call, target, response)   # the retry policy retries only its statuses
        return response
    except (RetryableStatus, UpstreamConnectError) as exc:
        permit.failure()                     # no-op when the status already settled it
        call.last_provider, call.last_error = target.provider, exc
        if gate.breaker.state is BreakerState.OPEN:
            raise _BreakerOpen(target.provider) from exc
        raise
    finally:
        permit.ignore()                      # settles only a cancelled call: a probe slot is handed back


async def _send(call: _Call, target: Target) -> aiohttp.ClientResponse:
    """POST the request to one provider within what is left of the deadline; the response head.

    Every call is reported to the registry's `on_attempt` callbacks: its time to the response head and
    its status, `timeout`, `connect_error` or `cancelled`.
    """
    body = upstream_body(call.req, target.upstream_model)
    monotonic = call.resilience.clock.monotonic
    started, outcome = monotonic(), "cancelled"
    try:
        client, remaining = call.pool[target.provider], call.deadline_at - started
        call.provider_config = client.config
        endpoint = call.req.endpoint
        if remaining > client.head_timeout_s + _TIMEOUT_SLACK_S:
            response = await client.post(endpoint.path, body, endpoint.api)   # aiohttp times out before the deadline
        else:
            async with asyncio.timeout(remaining):
                response = await client.post(endpoint.path, body, endpoint.api)
        outcome = str(response.status)
        return response
    except asyncio.TimeoutError as exc:
        outcome = "timeout"
        raise UpstreamConnectError(f"Provider '{target.provider}' timed out.") from exc
    except (aiohttp.ClientError, ConnectionError) as exc:
        outcome = "connect_error"
        raise UpstreamConnectError(
            f"Provider '{target.provider}' is unreachable ({type(exc).__name__}).") from exc
    finally:
        call.resilience.attempted(target.provider, monotonic() - started, outcome)


async def _retryable(call: _Call, target: Target, response: aiohttp.ClientResponse) -> RetryableStatus:
    """A retryable answer with its body read (within the deadline and 64 KiB) and its connection released.

    A larger or broken body is dropped with its connection: the answer is still the status it was.
    """
    limit = min(_ERROR_BODY_BYTES, call.pool[target.provider].config.max_response_bytes)
    try:
        async with asyncio.timeout(max(call.remaining(), 0.0)):
            body = await read_bounded(response, limit)
    except (BodyTooLarge, aiohttp.ClientError, asyncio.TimeoutError, ConnectionError):
        body = b""
    finally:
        response.release()
    return RetryableStatus(response.status, response.headers, body)


def _redirected(call: _Call, target: Target, response: aiohttp.ClientResponse) -> _Redirected:
    """A redirect, its connection dropped unread; the request's last error if no other target answers."""
    response.close()
    call.last_provider, call.last_error = target.provider, RetryableStatus(response.status, response.headers)
    return _Redirected(target.provider)


def _settle(permit: Permit, status: int) -> None:
    """Report an answer to the breaker: 2xx succeeds; 3xx, 429 and 5xx fail; other answers say nothing."""
    if 200 <= status < 300:
        permit.success()
    elif status == 429 or status >= 500 or 300 <= status < 400:
        permit.failure()
    else:
        permit.ignore()


def _timed_out(error: BaseException) -> bool:
    """Whether an UpstreamConnectError was a timeout."""
    return isinstance(error.__cause__, asyncio.TimeoutError)


def _retry_reason(error: BaseException | None) -> str:
    """A short label for why an attempt is retried: the status, `timeout` or `connect_error`."""
    if isinstance(error, RetryableStatus):
        return str(error.status)
    return "timeout" if error is not None and _timed_out(error) else "connect_error"


def _retry_reporter(resilience: ResilienceRegistry, provider: str) -> Callable[[RetryCallState], None]:
    """A tenacity `before_sleep` hook telling the registry's `on_retry` callbacks."""
    def report(state: RetryCallState) -> None:
        outcome = state.outcome
        resilience.retried(provider, _retry_reason(outcome.exception() if outcome else None))
    return report


def _all_failed(call: _Call, plan: Plan) -> UpstreamFailure:
    """The client's error when no target answered: shaped after the last upstream error."""
    error, provider, attempts = call.last_error, call.last_provider, call.attempts
    if error is None and call.remaining() <= 0:
        return UpstreamFailure("The request deadline passed before any provider was called.",
                               status=504, code="upstream_timeout", attempts=attempts)
    if error is None:
        return _providers_unavailable(call, plan)
    if isinstance(error, RetryableStatus):
        return _status_failure(call, provider, error)
    if _timed_out(error):
        return UpstreamFailure(f"Provider '{provider}' timed out.", status=504, code="upstream_timeout",
                               attempts=attempts)
    return UpstreamFailure(str(error), status=502, code="upstream_unreachable", attempts=attempts)


def _providers_unavailable(call: _Call, plan: Plan) -> UpstreamFailure:
    """Every breaker rejected the call: 503, Retry-After until the first one half-opens."""
    wait = call.resilience.reopens_in(t.provider for t in plan.targets)
    retry_after = max(1, math.ceil(wait)) if wait is not None else 1
    return UpstreamFailure(f"Every provider of '{plan.model}' is unavailable (circuit breakers open).",
                           status=503, code="providers_unavailable", attempts=call.attempts,
                           headers={"Retry-After": str(retry_after)})


def _status_failure(call: _Call, provider: str | None, error: RetryableStatus) -> UpstreamFailure:
    """The last answer was an HTTP error: 429 passes on with its wait, 503/504 stay, the rest is 502."""
    message = f"Provider '{provider}' answered {error.status}."
    if 300 <= error.status < 400:
        message = f"Provider '{provider}' answered a redirect ({error.status}), which the gateway does not follow."
    if error.status != 429:
        status = error.status if error.status in (503, 504) else 502
        return UpstreamFailure(message, status=status, code="upstream_error", attempts=call.attempts)
    retry = call.resilience.retry
    asked = error.retry_after(call.resilience.clock.now())
    wait = min(_DEFAULT_RETRY_AFTER_S if asked is None else asked, retry.retry_after_cap_s)
    return UpstreamFailure(message, status=429, code="rate_limit_exceeded", attempts=call.attempts,
                           headers={"Retry-After": str(math.ceil(wait))},
                           upstream_body=_openai_error(error.body, call.pool))


def _openai_error(body: bytes, pool: ProviderPool) -> dict[str, Any] | None:
    """The upstream's OpenAI-shaped error, secrets redacted, or None when the body is no such thing."""
    try:
        parsed = orjson.loads(pool.redactor.bytes(body))
    except orjson.JSONDecodeError:
        return None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return {"error": parsed["error"]}
    return None
