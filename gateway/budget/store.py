"""The budget store seam: domain operations on budget counters, implemented by every backend.

A counter is one window of one policy's budget (`CounterKey`); it holds what was spent and what is
reserved by requests in flight, in three integer units (nano-USD, tokens, requests). A request
reserves its worst case on every matching counter at once, then settles with its real usage, or
releases the reservation when it fails. A reservation not settled by its lease turns into spend, so
a crashed replica never under-counts. Every request id adds spend at most once: settling, lease
expiry and `record` (journal replay) each leave a marker that makes a later `record` a no-op.

A canary's shared state (its step and each arm's tally in it, `gateway.budget.canary_record`) is kept
beside the budgets: `canary_sync` adds a replica's tallies and reads the record back in one operation,
`canary_move` changes the step by compare-and-set.

Budget alerts are claimed, posted and marked delivered (`claim_alert`, `alert_delivered`): a claim is a
lease, and one not marked delivered when it ends can be taken over by any replica (`pending_alerts`),
so an alert is delivered at least once, and once in the normal case.

The spend ledger keeps one row per request (`LedgerEntry`), written in the same atomic operation as
the spend it explains, so ledger totals always equal the counters: settle, release and record file
the caller's row; a lease that ends files a `lease_expired` row with the reserved amounts. Rows are
kept in time order and trimmed to about `ledger_max_entries` (oldest first).

A backend declares what it offers beyond these operations in `capabilities` (`StoreCapabilities`): whether
its calls are answered in order, whether it bounds their time itself, whether it lets calls nobody waits
for share a write (and `flush` sends them), which operations it times itself. Callers read that value;
they never probe a store for attributes.

Backends: `gateway.budget.redis_store.RedisBudgetStore`, `gateway.budget.sqlite_store.SqliteBudgetStore`
(and `gateway.budget.instrumented.InstrumentedStore`, which times another one). All raise
`gateway.errors.StoreError` when the storage fails, and ValueError for invalid arguments.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

from gateway.budget.canary_record import ArmTally, CanaryRecord, CanaryStatus
from gateway.domain.pricing import MAX_AMOUNT, Charge
from gateway.errors import StoreError

__all__ = [
    "Unit", "UNITS", "MAX_AMOUNT", "SWEEP_MAX", "CounterKey", "Limits", "ReserveLine", "CounterState",
    "ReserveOutcome", "RESERVED", "PackedStates", "LedgerStatus", "LedgerEntry", "LEDGER_FIELDS", "BudgetStore",
    "StoreCapabilities", "PLAIN", "OperationObserver",
    "check_reserve_lines", "check_record_lines", "check_spare_ids", "check_spend", "time_ms",
]

Unit = Literal["usd", "tokens", "requests"]
UNITS: tuple[Unit, ...] = ("usd", "tokens", "requests")

SWEEP_MAX = 16
"""Reservations whose lease ended that one `reserve` or `read` turns into spend (bounded work per call)."""

Limits = tuple[int | None, int | None, int | None]
"""Limits in (usd_nano, tokens, requests) order; None means that unit is not limited."""


class CounterKey(NamedTuple):
    """Identifies one window of one policy's budget."""

    policy: str
    period: str
    window_id: str


class ReserveLine(NamedTuple):
    """What one request reserves on one counter; the counter may be dropped after `expires_at`.

    `group` 0: the line must fit. Lines of a group g > 0 (one provider's rate windows) are reserved
    together when they all fit and skipped otherwise (the outcome names the groups skipped).
    """

    counter: CounterKey
    amount: Charge
    limits: Limits
    expires_at: float
    group: int = 0


class CounterState(NamedTuple):
    """A counter's spend and its reservations in flight."""

    counter: CounterKey
    spent: Charge
    reserved: Charge


@dataclass(frozen=True)
class ReserveOutcome:
    """The answer to `reserve`: reserved, or refused by the line and unit named (nothing was reserved).

    `held`: the refusing amount alone fits beside what is spent, so only reservations in flight (requests,
    spares) hold the room, and it may come back within seconds.
    """

    ok: bool
    refused_index: int | None = None
    refused_unit: Unit | None = None
    held: bool = False
    retry_after: float | None = None
    """Refused by a rate window: seconds until the request would fit (-1: it never fits); else None."""
    used: tuple[int, ...] = ()
    """Reserved: each group-0 rate line's (requests, tokens) used in its window, this request included."""
    skipped: tuple[int, ...] = ()
    """Reserved: the groups whose lines did not fit, so were not reserved."""


RESERVED = ReserveOutcome(True)


class PackedStates(Sequence[CounterState]):
    """Counter states as a store answered them, six integers per counter, decoded when first read.

    `packed` is the integers as they came: a sequence, or one space-separated string. Most answers are
    never read (a served request's reservation and settlement), so decoding them at once would be wasted
    work on the request path.
    """

    __slots__ = ("_counters", "_packed", "_decoded")

    def __init__(self, counters: Sequence[CounterKey], packed: Sequence[int] | bytes | str) -> None:
        self._counters, self._packed = counters, packed
        self._decoded: list[CounterState] | None = None

    def _states(self) -> list[CounterState]:
        if self._decoded is None:
            packed = self._packed
            flat = [int(word) for word in packed.split()] if isinstance(packed, (bytes, str)) else packed
            if len(flat) != 6 * len(self._counters):
                raise StoreError(f"the store answered {len(flat)} values for {len(self._counters)} counters")
            self._decoded = [CounterState(counter, Charge(*flat[6 * i:6 * i + 3]), Charge(*flat[6 * i + 3:6 * i + 6]))
                             for i, counter in enumerate(self._counters)]
        return self._decoded

    def __getitem__(self, index):  # type: ignore[no-untyped-def, override]
        return self._states()[index]

    def __len__(self) -> int:
        return len(self._counters)

    def __eq__(self, other: object) -> bool:
        return list(self) == other if isinstance(other, Sequence) else NotImplemented

    def __repr__(self) -> str:
        return repr(self._states())


LedgerStatus = Literal["served", "failed", "lease_expired", "cache_hit"]
"""served: charged its real cost; failed: released, no spend; lease_expired: charged what it reserved;
cache_hit: answered from the response cache, no spend (`saved_nano` is what the answer cost when bought)."""


class LedgerEntry(NamedTuple):
    """One request's row in the spend ledger; money in nano-USD, `time` in epoch seconds (ms precision).

    `model` is the model that served the request, `requested_model` the one the client asked for (they
    differ after a downgrade or a failover to a renamed model). A `lease_expired` row is written by the
    store, which knows only the reservation: it has no caller, team, model or provider, its cost is the
    reserved amount and its reserved tokens count as `prompt_tokens`. Fields added later have defaults,
    so rows written before them still read.
    """

    time: float
    request_id: str
    caller: str | None
    team: str | None
    policies: tuple[str, ...]
    model: str | None
    provider: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_nano: int
    status: LedgerStatus
    latency_ms: int
    attempts: int
    requested_model: str | None = None
    usage_estimated: bool = False            # charged on the gateway's count or bound, not the upstream's usage
    saved_nano: int = 0                      # a cache hit: what the cached answer cost when it was bought
    endpoint: str | None = None              # chat, completions, embeddings, responses, messages (None: unknown,
                                             # as in rows filed before it was recorded and lease_expired rows)
    cache_write_tokens: int = 0              # of prompt_tokens, written to the provider's prompt cache
    user: str | None = None                  # the end user the request was made for (OpenAI `user` or header)
    session: str | None = None               # the x-gateway-session it belongs to


LEDGER_FIELDS = len(LedgerEntry._fields)


OperationObserver = Callable[[str, float, bool], None]
"""Hears one store operation: (its name, seconds it took, whether it failed)."""


@dataclass(frozen=True, slots=True)
class StoreCapabilities:
    """What a backend offers beyond the domain operations, declared once; the engine, the journal and
    the timing wrapper read it instead of probing the store."""

    in_order: bool = False
    """Calls are answered in the order they are made: a release made after a reserve runs after it, even
    while the reserve is still on its way."""

    bounds_time: bool = False
    """Every call answers or fails within the store's own timeout: a caller needs no timer of its own."""

    shares_writes: bool = False
    """Settlements, releases and spare batches not needed now may wait a moment to share one write with
    other calls (on Redis, up to 2 ms); `flush` sends them at once, and so does the next call that is not
    held back."""

    self_timed: frozenset[str] = frozenset()
    """Operations that report their own duration to the observer given to `observe_calls`."""


PLAIN = StoreCapabilities()
"""A store whose calls run on their own (in any order, bounded by no timeout of its own), each sent at once,
none timed by itself."""


class BudgetStore(Protocol):
    """Atomic budget operations; `now` is the caller's clock, in epoch seconds, on every call.

    `reserve` is all-or-nothing: when any line's spent + reserved + amount would exceed its limit in
    any limited unit, nothing changes and the outcome names the first such line and unit. Rate windows
    and in-flight counters (see `gateway.budget.rate_windows`) count what is used, with no spent /
    reserved split: settling a rate line replaces its amount by the actual one in its bucket; settling,
    releasing or the lease's end frees an in-flight line. Lines of a group g > 0 are optional (see
    `ReserveLine`): the groups that do not fit are skipped; when `need_group` and every group is
    skipped, the reservation is refused like a line that does not fit. Otherwise
    every amount is added to its counter's reserved total and the reservation is kept under
    `request_id` until `lease_until`. `reserve` and `read` also turn a bounded number of reservations
    whose lease ended (lease_until < now) into spend; `settle`, `release` and `record` do that for
    their own request id, and then return False (settle: None).

    `settle`, `release` and `record` write `entry` to the ledger when they change anything, in the same
    atomic operation. `ledger` rows are filed at max(their time, the latest row's time), so the ledger
    stays in order when a replica's clock lags or a journal is replayed.

    An operation answers with an awaitable: a coroutine, or a future already on its way (a store whose
    capabilities say `shares_writes` may hold a settlement or release back until `flush`).
    """

    @property
    def capabilities(self) -> StoreCapabilities:
        """What this store offers beyond the operations (see `StoreCapabilities`)."""

    def reserve(
        self, request_id: str, lines: Sequence[ReserveLine], now: float, lease_until: float,
        need_group: bool = False,
    ) -> Awaitable[ReserveOutcome]:
        """Reserve every line or none; ValueError if `request_id` already holds a reservation.

        No lines: ok, and nothing is stored (a later settle or release returns False).
        """

    def reserve_spares(
        self, spare_ids: Sequence[str], lines: Sequence[ReserveLine], now: float, lease_until: float, room: int,
        needed_now: bool = True,
    ) -> Awaitable[ReserveOutcome]:
        """`reserve` of the same lines under each id, all or none, in one operation; refused unless
        (len(spare_ids) + room - 1) x each amount would fit, so spares leave room for `room` - 1 more.
        `needed_now`: requests may find their pool empty before these arrive (False: the pool still holds
        plenty, so they are not needed at once).

        ValueError if an id already holds a reservation, or there are no ids or no lines.
        """

    def settle(self, request_id: str, actual: Sequence[tuple[CounterKey, Charge]], now: float,
               entry: LedgerEntry | None = None) -> Awaitable[Sequence[CounterState] | None]:
        """Turn the live reservation into `actual` spend; the states of `actual`'s counters after it.

        None (no change) if there is no live reservation, so a settle sent again (the journal replaying one
        whose answer was lost) counts once. Nothing of the request stays in the store but its ledger row.
        Counters of the reservation missing from `actual` get no spend; ValueError (no change) if
        `actual` names a counter the reservation does not hold.
        """

    def release(self, request_id: str, now: float, entry: LedgerEntry | None = None) -> Awaitable[bool]:
        """Drop the live reservation without spend; False (no change) if there is none."""

    def record(
        self, request_id: str, lines: Sequence[tuple[CounterKey, Charge, float]], now: float,
        entry: LedgerEntry | None = None,
    ) -> Awaitable[bool]:
        """Add spend without a reservation (journal replay); lines are (counter, spend, expires_at).

        False (no change) if `request_id` already recorded spend, or its reservation's lease ended and
        became its spend. A live reservation under the same id is dropped, as the recorded spend replaces
        it. A settled request leaves no marker: the journal replays a reserved request with settle or
        release, never with record. ValueError if `lines` is empty.
        """

    def file_rows(self, entries: Sequence[LedgerEntry]) -> Awaitable[None]:
        """Add ledger rows that move no counter (cache hits), in order, each filed as `settle` files one."""

    def read(self, counters: Sequence[CounterKey], now: float) -> Awaitable[list[CounterState]]:
        """The state of each counter, in order; one never written (or dropped after expiry) reads zero."""

    def ledger(self, since: float, until: float, limit: int) -> Awaitable[list[LedgerEntry]]:
        """The oldest `limit` ledger rows with since <= time < until, in time order."""

    def claim_alert(self, key: str, payload: str, now: float, lease_until: float,
                    expires_at: float) -> Awaitable[bool]:
        """Claim the delivery of alert `key` until `lease_until`, across replicas.

        True for the first claim, which stores `payload` (what any replica needs to send it), and for a
        claim made after an earlier one's lease ended (lease_until < now) without `alert_delivered`: that
        one takes the alert over, keeping the stored payload. False while another claim's lease runs,
        and once the alert was delivered. The alert is forgotten after `expires_at` (its window's end).
        """

    def alert_delivered(self, key: str, now: float) -> Awaitable[None]:
        """Mark alert `key` delivered: no claim succeeds again until it is forgotten. No-op if unknown."""

    def pending_alerts(self, now: float, limit: int) -> Awaitable[list[tuple[str, str]]]:
        """Up to `limit` alerts claimed but not delivered whose lease ended, oldest lease first, as
        (key, payload): what a replica that claimed them and died (or gave up) left to be sent."""

    def canary_sync(self, canary: str, step: int, tallies: Sequence[ArmTally], now: float,
                    expires_at: float) -> Awaitable[CanaryRecord]:
        """Add `tallies` (control, candidate) to canary `canary`'s arms when it is ramping at `step`, and
        return its record, all in one atomic operation; tallies of another step or status are dropped.

        A canary never seen starts ramping at step 0 since `now`. No tallies: a read. The record is kept
        until `expires_at` (each call moves that on).
        """

    def canary_move(self, canary: str, from_step: int, to_step: int, status: CanaryStatus, now: float,
                    expires_at: float) -> Awaitable[bool]:
        """Move a ramping canary from `from_step` to `to_step` with `status`, its tallies cleared and its step
        begun `now`; False (no change) when it is not ramping at `from_step` (another replica moved it).

        ValueError for a step that goes back or an unknown status.
        """

    def ping(self) -> Awaitable[bool]:
        """True when the storage answers."""

    def flush(self) -> None:
        """Send the calls held back to share a write now: someone waits for them (no-op without `shares_writes`)."""

    def observe_calls(self, observe: OperationObserver) -> None:
        """Report the duration and outcome of each operation in `capabilities.self_timed` to `observe`."""

    def close(self) -> Awaitable[None]:
        """Release connections or files."""


def time_ms(epoch_s: float) -> int:
    """Epoch seconds as whole milliseconds: the precision of ledger times."""
    return math.floor(epoch_s * 1000 + 0.5)


def check_spare_ids(spare_ids: Sequence[str], lines: Sequence[ReserveLine]) -> None:
    """Raise ValueError for no spare ids, an id named twice, or no lines."""
    if not spare_ids or not lines:
        raise ValueError("reserve_spares needs at least one id and one line")
    _check_distinct(spare_ids, "spare id")


def check_spend(spend: Sequence[tuple[CounterKey, Charge]]) -> None:
    """Raise ValueError for an out-of-range amount or a counter named twice."""
    _check_distinct([counter for counter, _ in spend])
    checked = None
    for _, charge in spend:
        if charge is not checked:            # the lines of one request usually share one charge
            _check_charge(charge)
            checked = charge


def check_record_lines(lines: Sequence[tuple[CounterKey, Charge, float]]) -> None:
    """Raise ValueError for no lines, an out-of-range amount or a counter named twice."""
    if not lines:
        raise ValueError("record needs at least one line")
    check_spend([(counter, charge) for counter, charge, _ in lines])


def check_reserve_lines(lines: Sequence[ReserveLine]) -> None:
    """Raise ValueError for an out-of-range amount or limit, or a counter named twice."""
    counters: set[CounterKey] = set()
    checked = None
    for line in lines:
        if line.counter in counters:
            raise ValueError("the same counter is named twice")
        counters.add(line.counter)
        if line.amount is not checked:       # the lines of one request usually share one amount
            _check_charge(line.amount)
            checked = line.amount
        for limit in line.limits:
            if limit is not None and not (type(limit) is int and 0 <= limit <= MAX_AMOUNT):
                unit = UNITS[line.limits.index(limit)]
                _check_amount(limit, f"{unit} limit")


def _check_distinct(items: Sequence[object], what: str = "counter") -> None:
    if len(set(items)) != len(items):
        raise ValueError(f"the same {what} is named twice")


def _check_charge(charge: Charge) -> None:
    usd, tokens, requests = charge.usd_nano, charge.tokens, charge.requests
    if type(usd) is type(tokens) is type(requests) is int and 0 <= min(usd, tokens, requests) \
            and max(usd, tokens, requests) <= MAX_AMOUNT:
        return                               # the usual case, checked in one expression
    for unit, value in zip(UNITS, (usd, tokens, requests)):
        _check_amount(value, unit)


def _check_amount(value: int, what: str) -> None:
    if not isinstance(value, int) or not 0 <= value <= MAX_AMOUNT:
        raise ValueError(f"{what} must be an integer in [0, 2^53): {value!r}")
