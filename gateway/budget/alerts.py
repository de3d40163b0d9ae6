"""Budget alerts by webhook: found after a settle, delivered at least once across replicas, off the request path.

The engine hands each settle's counter states to `AlertSender.observe`, which does no I/O: it finds the
thresholds newly reached by policies that have an `alerts` webhook and queues them on their receiver's
queue (one bounded queue per webhook URL; when it is full the alert is dropped with a log line).

Each receiver has its own delivery loop, so a dead or slow receiver delays only its own alerts. A loop
takes one alert at a time: claim -> post -> mark delivered. The claim (`BudgetStore.claim_alert`) is a
lease of LEASE_S stored with the alert's payload; the first claim across replicas wins, so one
replica posts in the normal case. It posts with retries (exponential backoff with jitter, injected
sleep) while the lease leaves time for another try, then marks the alert delivered. A claim that is not
marked delivered when its lease ends (the replica died, or the receiver stayed down) is taken over by
any replica: every replica looks for such alerts every SWEEP_S (`sweep`) and queues them again, to be
claimed and posted from the stored payload. So an alert is delivered at least once while its window
lasts, and exactly once unless a delivery's mark is lost.

When one settle reaches several thresholds at once, only the highest is announced; the lower ones are
claimed and marked delivered with it, so no replica announces them after it. A receiver that refuses
an alert (4xx other than 429) is not retried: the alert counts as delivered.

The store holds the message and policy name, never the webhook URL (a secret): a replica taking an alert
over finds the URL in its own config.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from gateway.background import BackgroundFailures, keep_running
from gateway.budget.alert_rules import Alert, reached_alerts, webhook_payload
from gateway.budget.store import BudgetStore, CounterState
from gateway.clock import Clock
from gateway.config.holder import ConfigHolder
from gateway.config.model import Policy, Settings
from gateway.errors import StoreError

__all__ = ["AlertSender", "Delivery", "LEASE_S", "SWEEP_S", "POST_TIMEOUT_S"]

log = logging.getLogger("gateway.alerts")
Sleep = Callable[[float], Awaitable[None]]

QUEUE_SIZE = 1_000         # alerts waiting per receiver
SEEN_MAX = 10_000          # alert keys remembered per replica (they name their window, so old ones go stale)
POST_TIMEOUT_S = 10.0
LEASE_S = 120.0            # a claim's hold on an alert; taken over by any replica once it ends undelivered
SWEEP_S = 15.0             # how often a replica looks for such alerts
PENDING_PAGE = 100         # alerts taken over per look
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 30.0


@dataclass(frozen=True)
class Delivery:
    """One alert for one receiver: its key, what to post, and the lower thresholds it stands for."""

    key: str
    policy: str
    body: dict[str, Any]
    expires_at: float                        # the end of the alert's window: the store forgets it then
    lower: tuple[str, ...] = ()              # reached in the same settle: claimed and closed, never posted

    @property
    def payload(self) -> str:
        """What the store keeps with the claim, so any replica can send it: never the webhook URL."""
        return orjson.dumps({"policy": self.policy, "body": self.body, "expires_at": self.expires_at}).decode()

    @classmethod
    def of(cls, alerts: Sequence[Alert]) -> Delivery:
        """The delivery of the highest of `alerts` (lowest first), standing for the others."""
        top = alerts[-1]
        return cls(top.key, top.policy, webhook_payload(top), top.resets_at.timestamp(),
                   tuple(alert.key for alert in alerts[:-1]))

    @classmethod
    def taken_over(cls, key: str, payload: str) -> Delivery:
        """A delivery from the payload another replica stored with its claim."""
        stored = orjson.loads(payload)
        return cls(key, stored["policy"], stored["body"], stored["expires_at"])


@dataclass
class _Receiver:
    """One webhook URL's queue and its delivery loop."""

    url: str
    queue: asyncio.Queue[Delivery]
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class AlertSender:
    """Queues reached thresholds per receiver and delivers each at least once across replicas."""

    def __init__(self, store: BudgetStore, config: ConfigHolder, clock: Clock,
                 failures: BackgroundFailures | None = None, *, sleep: Sleep = asyncio.sleep,
                 pace: Sleep = asyncio.sleep, queue_size: int = QUEUE_SIZE) -> None:
        self._store = store
        self._config = config
        self._clock = clock
        self._failures = failures or BackgroundFailures()
        self._sleep = sleep                  # retry backoff (and the pause after a failed turn)
        self._pace = pace                    # between sweeps
        self._queue_size = queue_size
        self._receivers: dict[str, _Receiver] = {}
        self._queued: set[str] = set()       # keys queued or being delivered here
        self._seen: set[str] = set()
        self._policies: tuple[Settings | None, dict[str, Policy]] = (None, {})
        self._session: aiohttp.ClientSession | None = None
        self._sweeping: asyncio.Task[None] | None = None

    def observe(self, states: Sequence[CounterState]) -> None:
        """Queue the thresholds `states` reached that this replica has not queued yet (a settle listener)."""
        policies = self._policy_index()
        if not policies:                     # no policy has a webhook: nothing to look at
            return
        now = self._clock.now()
        for state in states:
            policy = policies.get(state.counter.policy)
            if policy is None or policy.alerts is None or policy.each == "user":   # not a webhook per end user
                continue
            fresh = [alert for alert in reached_alerts(policy, state, now) if alert.key not in self._seen]
            if fresh:
                self._remember(fresh)
                if not self._enqueue(policy.alerts.webhook, Delivery.of(fresh)):
                    self._seen.difference_update(alert.key for alert in fresh)   # a later settle offers them again

    def send(self, url: str, delivery: Delivery) -> bool:
        """Queue one alert that no settle found (a canary rollback) for `url`; False when its queue is full."""
        return self._enqueue(url, delivery)

    def receivers(self) -> dict[str, Policy]:
        """Each webhook URL of the active policies, with the first policy that names it."""
        receivers: dict[str, Policy] = {}
        for policy in self._policy_index().values():
            if policy.alerts is not None:
                receivers.setdefault(policy.alerts.webhook, policy)
        return receivers

    def start(self, session: aiohttp.ClientSession) -> None:
        """Start delivering with `session`: every receiver's loop, and the sweep for alerts to take over."""
        self._session = session
        for receiver in self._receivers.values():
            self._start_receiver(receiver)
        self._sweeping = asyncio.create_task(keep_running("alert_delivery", self._sweep_turn, self._failures,
                                                          sleep=self._sleep))

    async def stop(self) -> None:
        """Stop every loop (a delivery in flight is cancelled; its claim is taken over after its lease)."""
        tasks = [task for task in (self._sweeping, *(r.task for r in self._receivers.values())) if task]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def idle(self) -> None:
        """Wait until every queued alert was delivered, dropped or lost to another replica."""
        for receiver in list(self._receivers.values()):
            await receiver.queue.join()

    async def sweep(self) -> int:
        """Queue the alerts whose claim ended undelivered (any replica's); how many were queued."""
        policies, queued = self._policy_index(), 0
        if not policies:                     # no webhook configured: nothing could be pending
            return 0
        try:
            for key, payload in await self._store.pending_alerts(self._clock.now(), PENDING_PAGE):
                if key in self._queued:
                    continue
                delivery = Delivery.taken_over(key, payload)
                policy = policies.get(delivery.policy)
                if policy is not None and policy.alerts is not None:
                    queued += self._enqueue(policy.alerts.webhook, delivery)
                    continue
                log.warning("budget alert of policy '%s' dropped: the policy has no webhook any more",
                            delivery.policy)
                await self._store.alert_delivered(key, self._clock.now())
        except StoreError as exc:
            log.warning("budget alerts to take over could not be read: %s", exc)
        return queued

    async def _sweep_turn(self) -> None:
        await self.sweep()
        await self._pace(SWEEP_S)

    def _policy_index(self) -> dict[str, Policy]:
        """The active policies that have a webhook, by name, rebuilt when the config is reloaded."""
        settings = self._config.current
        if self._policies[0] is not settings:
            self._policies = (settings, {policy.name: policy for policy in settings.policies if policy.alerts})
        return self._policies[1]

    def _remember(self, alerts: Sequence[Alert]) -> None:
        if len(self._seen) >= SEEN_MAX:
            self._seen.clear()
        self._seen.update(alert.key for alert in alerts)

    def _enqueue(self, url: str, delivery: Delivery) -> bool:
        """Queue `delivery` on its receiver's queue; False (with a log line) when that queue is full."""
        receiver = self._receivers.get(url)
        if receiver is None:
            receiver = self._receivers[url] = _Receiver(url, asyncio.Queue(self._queue_size))
            if self._session is not None:
                self._start_receiver(receiver)
        try:
            receiver.queue.put_nowait(delivery)
        except asyncio.QueueFull:
            log.warning("budget alert queue full: dropped the alert %s of policy '%s'", delivery.key, delivery.policy)
            return False
        self._queued.add(delivery.key)
        return True

    def _start_receiver(self, receiver: _Receiver) -> None:
        receiver.task = asyncio.get_running_loop().create_task(
            keep_running("alert_delivery", lambda: self._deliver_next(receiver), self._failures, sleep=self._sleep))

    async def _deliver_next(self, receiver: _Receiver) -> None:
        """One turn of a receiver's loop: its next alert, claimed, posted and marked delivered."""
        delivery = await receiver.queue.get()
        try:
            await self._deliver(receiver.url, delivery)
        except Exception:
            self._seen.difference_update((delivery.key, *delivery.lower))   # a later settle may offer it again
            raise
        finally:
            self._queued.discard(delivery.key)
            receiver.queue.task_done()

    async def _deliver(self, url: str, delivery: Delivery) -> None:
        now = self._clock.now()
        lease_until = now + LEASE_S
        try:
            if not await self._claim(delivery.key, delivery, now, lease_until):
                return                       # another replica holds it, or it was delivered
            for key in delivery.lower:
                if await self._claim(key, delivery, now, lease_until):
                    await self._store.alert_delivered(key, now)
        except StoreError as exc:
            self._seen.difference_update((delivery.key, *delivery.lower))   # a later settle offers them again
            log.warning("budget alert for policy '%s' not sent: the store could not claim it (%s)",
                        delivery.policy, exc)
            return
        if await self._post(url, delivery, lease_until - POST_TIMEOUT_S):
            await self._delivered(delivery)

    def _claim(self, key: str, delivery: Delivery, now: float, lease_until: float) -> Awaitable[bool]:
        return self._store.claim_alert(key, delivery.payload, now, lease_until, delivery.expires_at)

    async def _delivered(self, delivery: Delivery) -> None:
        try:
            await self._store.alert_delivered(delivery.key, self._clock.now())
        except StoreError as exc:
            log.warning("budget alert for policy '%s' was posted but not marked delivered (%s): it may be "
                        "posted again when its lease ends", delivery.policy, exc)

    async def _post(self, url: str, delivery: Delivery, last_try_by: float) -> bool:
        """POST the alert until it is answered, retrying with backoff while the claim's lease has room for
        another try; True once the receiver answered (even with a refusal). Logs never name the URL."""
        attempt = 0
        while True:
            failure = await self._post_once(url, delivery)
            if failure is None:
                return True
            wait = min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** attempt) + random.uniform(0, 1)
            if self._clock.now() + wait > last_try_by:
                log.warning("budget alert for policy '%s' not delivered within its lease (%s); any replica "
                            "takes it over when the lease ends", delivery.policy, failure)
                return False
            attempt += 1
            await self._sleep(wait)

    async def _post_once(self, url: str, delivery: Delivery) -> str | None:
        """One POST; None when the receiver took it (or refused it for good), else why to try again."""
        assert self._session is not None
        try:
            async with self._session.post(url, json=delivery.body) as response:
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return type(exc).__name__         # its message may quote the webhook URL, a secret
        if status == 429 or status >= 500:
            return f"webhook answered {status}"
        if status >= 400:
            log.warning("budget alert for policy '%s' refused by its webhook: %d", delivery.policy, status)
        return None
