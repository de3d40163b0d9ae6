"""Sliding rate windows and requests in flight: how their counters are laid out in every store.

A rate limit (`per: second | minute | hour`) counts what requests use in a sliding window of that
length. The window is cut into BUCKETS sub-windows (buckets); a request reserves on the bucket holding
`now`, and a check sums the BUCKETS + 1 newest buckets, which always cover the last full window: so
whatever instant a window starts at, what is admitted inside it never exceeds the limit (no burst at a
boundary, as fixed windows allow). The price of the strictness is up to one bucket of waiting
(1/BUCKETS of the window) more than an exact sliding log would ask; the gain over a log is a bounded
size (2 x BUCKETS counters per window, whatever the limit). GCRA / token buckets were not chosen: they
bound a rate, not what a window admits (a full bucket lets `limit` through at once and then the rate
on top), and a reservation of worst-case tokens cannot be given back to them exactly.

Stores keep a window's buckets in epochs of BUCKETS buckets: one hash (a row set in SQLite) per epoch,
its start in the key, expiring when no window can reach it any more. A check at bucket k reads the
current epoch and the previous one.

A `max_concurrent` counter holds the requests in flight; each reservation holds one until it settles,
is released, or its lease ends (a crashed replica's count goes with its lease: `store.lease_s`).

Counter keys: `period` is the window's `per` (or CONCURRENT); `window_id` is the absolute bucket
number k (none for CONCURRENT), then `@` and the `each` value when the policy counts per key, team or
model (quoted: no ':' or '@' in it). Budget counters of an `each` policy carry `@<each>` the same way.
"""

from __future__ import annotations

import math
from typing import Literal
from urllib.parse import quote

from gateway.budget.store import CounterKey

__all__ = [
    "Per", "PERIODS", "CONCURRENT", "BUCKETS", "bucket_ms", "bucket_of", "kind_of", "rate_counter",
    "concurrent_counter", "with_each", "split_each", "epoch_of", "window_s", "bucket_end",
]

Per = Literal["second", "minute", "hour"]
PERIODS: dict[str, int] = {"second": 1000, "minute": 60_000, "hour": 3_600_000}
"""Window length in milliseconds of each `per`."""
BUCKETS = 20
"""Buckets per window: a refusal waits at most 1/20 of the window (3 s of a minute) longer than an exact
count would, and a check reads at most BUCKETS bucket counters."""
CONCURRENT = "concurrent"
"""The period of a requests-in-flight counter."""

Kind = Literal["budget", "rate", "concurrent"]


def kind_of(counter: CounterKey) -> Kind:
    """What a counter counts: a calendar budget, a sliding rate window, or requests in flight."""
    period = counter.period
    if period in PERIODS:
        return "rate"
    return "concurrent" if period == CONCURRENT else "budget"


def bucket_ms(per: str) -> int:
    """Milliseconds of one bucket of a `per` window."""
    return PERIODS[per] // BUCKETS


def window_s(per: str) -> float:
    """The window's length in seconds."""
    return bucket_ms(per) * BUCKETS / 1000


def bucket_of(per: str, now: float) -> int:
    """The absolute number of the bucket holding `now` (epoch seconds)."""
    return math.floor(now * 1000) // bucket_ms(per)


def bucket_end(per: str, bucket: int) -> float:
    """When bucket number `bucket` ends, in epoch seconds."""
    return (bucket + 1) * bucket_ms(per) / 1000


def epoch_of(bucket: int) -> int:
    """The epoch (BUCKETS buckets) holding a bucket."""
    return bucket // BUCKETS


def with_each(window_id: str, each: str | None) -> str:
    """A window id of one `each` value (its counters apart from every other value's)."""
    return window_id if each is None else f"{window_id}@{quote(each, safe='')}"


def split_each(window_id: str) -> tuple[str, str]:
    """(window id, quoted each value or '') of a counter's window id."""
    window, _, each = window_id.partition("@")
    return window, each


def rate_counter(policy: str, per: str, now: float, each: str | None = None) -> CounterKey:
    """The counter a request reserves on at `now` for a `per` window of `policy` (one `each` value)."""
    return CounterKey(policy, per, with_each(str(bucket_of(per, now)), each))


def concurrent_counter(policy: str, each: str | None = None) -> CounterKey:
    """The requests-in-flight counter of `policy` (one `each` value)."""
    return CounterKey(policy, CONCURRENT, with_each("", each))
