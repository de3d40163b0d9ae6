"""Budget alerts by webhook: found after a settle, announced once across replicas, sent off the request path.

The engine hands each settle's counter states to `AlertSender.observe`, which does no I/O: it finds
the thresholds newly reached by policies that have an `alerts` webhook and queues them (a bounded
queue; when it is full the alert is dropped with a log line). One worker task per app takes them in
turn, claims each in the store (`claim_alert`: across replicas, the first claim wins and announces)
and posts it with tenacity retries (exponential backoff with jitter, bounded attempts and total time,
injectable sleep). A slow or dead receiver only ever delays that worker.

When one settle reaches several thresholds at once, only the highest is announced; the lower ones
are claimed too, so no replica announces them after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import aiohttp
from aiohttp import web
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, stop_after_delay
from tenacity import wait_exponential_jitter

from gateway.appkeys import ALERTS, BUDGET, CLOCK, CONFIG
from gateway.budget.alert_rules import Alert, reached_alerts, webhook_payload
from gateway.budget.store import BudgetStore, CounterState
from gateway.clock import Clock
from gateway.config.holder import ConfigHolder
from gateway.config.model import Policy, Settings
from gateway.errors import StoreError

__all__ = ["AlertSender", "add_budget_alerts"]

log = logging.getLogger("gateway.alerts")
Sleep = Callable[[float], Awaitable[None]]

QUEUE_SIZE = 1_000
SEEN_MAX = 10_000          # alert keys remembered per replica (they name their window, so old ones go stale)
POST_TIMEOUT_S = 10.0
MAX_ATTEMPTS = 5
MAX_RETRY_S = 120.0
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 30.0


class WebhookRetryable(Exception):
    """The receiver answered with a status worth retrying (429 or 5xx)."""


class AlertSender:
    """Queues reached thresholds and delivers each to its policy's webhook once across replicas."""

    def __init__(self, store: BudgetStore, config: ConfigHolder, clock: Clock, *,
                 sleep: Sleep = asyncio.sleep, queue_size: int = QUEUE_SIZE) -> None:
        self._store = store
        self._config = config
        self._clock = clock
        self._sleep = sleep
        self._queue: asyncio.Queue[list[Alert]] = asyncio.Queue(queue_size)
        self._seen: set[str] = set()
        self._policies: tuple[Settings | None, dict[str, Policy]] = (None, {})

    def observe(self, states: Sequence[CounterState]) -> None:
        """Queue the thresholds `states` reached that this replica has not queued yet (a settle listener)."""
        policies = self._policy_index()
        if not policies:                     # no policy has a webhook: nothing to look at
            return
        now = self._clock.now()
        for state in states:
            policy = policies.get(state.counter.policy)
            if policy is None or policy.alerts is None:
                continue
            fresh = [alert for alert in reached_alerts(policy, state, now) if alert.key not in self._seen]
            if fresh:
                self._enqueue(fresh)

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Deliver queued alerts one after another, forever; one failing delivery never stops the next."""
        while True:
            alerts = await self._queue.get()
            try:
                await self._deliver(session, alerts)
            except Exception as exc:  # its message may quote the webhook URL, a secret: log the type only
                log.error("budget alert for policy '%s' failed: %s", alerts[-1].policy, type(exc).__name__)
            finally:
                self._queue.task_done()

    async def idle(self) -> None:
        """Wait until every queued alert was delivered, dropped or lost to another replica."""
        await self._queue.join()

    def _policy_index(self) -> dict[str, Policy]:
        """The active policies that have a webhook, by name, rebuilt when the config is reloaded."""
        settings = self._config.current
        if self._policies[0] is not settings:
            self._policies = (settings, {policy.name: policy for policy in settings.policies if policy.alerts})
        return self._policies[1]

    def _enqueue(self, alerts: list[Alert]) -> None:
        if len(self._seen) >= SEEN_MAX:
            self._seen.clear()
        self._seen.update(alert.key for alert in alerts)
        try:
            self._queue.put_nowait(alerts)
        except asyncio.QueueFull:
            self._seen.difference_update(alert.key for alert in alerts)  # a later settle may offer them again
            top = alerts[-1]
            log.warning("budget alert queue full: dropped the %s alert of policy '%s' (%s)",
                        top.threshold, top.policy, top.period)

    async def _deliver(self, session: aiohttp.ClientSession, alerts: list[Alert]) -> None:
        """Announce the highest alert if this replica claims it first; claim the lower ones as well."""
        top = alerts[-1]
        try:
            if not await self._claim(top):
                return
            for lower in alerts[:-1]:
                await self._claim(lower)
        except StoreError as exc:
            self._seen.difference_update(alert.key for alert in alerts)  # a later settle offers them again
            log.warning("budget alert for policy '%s' not sent: the store could not dedupe it (%s)",
                        top.policy, exc)
            return
        await self._post(session, top)

    async def _claim(self, alert: Alert) -> bool:
        return await self._store.claim_alert(alert.key, alert.resets_at.timestamp(), self._clock.now())

    async def _post(self, session: aiohttp.ClientSession, alert: Alert) -> None:
        """POST the alert with retries; failures are logged without the webhook URL (a secret)."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(MAX_ATTEMPTS) | stop_after_delay(MAX_RETRY_S),
            wait=wait_exponential_jitter(initial=BACKOFF_INITIAL_S, max=BACKOFF_MAX_S),
            retry=retry_if_exception_type((WebhookRetryable, aiohttp.ClientError, TimeoutError)),
            sleep=self._sleep, reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    await self._post_once(session, alert)
        except (WebhookRetryable, aiohttp.ClientError, TimeoutError) as exc:
            log.warning("budget alert for policy '%s' not delivered after retries: %s",
                        alert.policy, type(exc).__name__)

    async def _post_once(self, session: aiohttp.ClientSession, alert: Alert) -> None:
        async with session.post(alert.target.webhook, json=webhook_payload(alert)) as response:
            if response.status == 429 or response.status >= 500:
                raise WebhookRetryable(f"webhook answered {response.status}")
            if response.status >= 400:
                log.warning("budget alert for policy '%s' refused by its webhook: %d", alert.policy,
                            response.status)


def add_budget_alerts(app: web.Application, *, sleep: Sleep = asyncio.sleep) -> None:
    """Listen to the engine's settles and run the webhook sender for the app's lifetime."""
    engine = app[BUDGET]
    if engine.store is None:
        return
    app[ALERTS] = sender = AlertSender(engine.store, app[CONFIG], app[CLOCK], sleep=sleep)
    engine.on_settled.append(sender.observe)
    app.cleanup_ctx.append(_alert_delivery)


async def _alert_delivery(app: web.Application) -> AsyncIterator[None]:
    """One ClientSession and one worker task; both end with the app, cancelling a delivery in flight."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=POST_TIMEOUT_S)) as session:
        task = asyncio.create_task(app[ALERTS].run(session))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
