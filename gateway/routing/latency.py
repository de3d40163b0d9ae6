"""Latency in shared buckets: every replica counts answers per bucket, so any replica can read the p95.

Bucket b holds latencies up to 2^(b/8) ms (each bucket ~9% wider than the one before), from 1 ms up to
bucket MAX_BUCKET (~33 minutes); a p95 read from them is the upper bound of the bucket it falls in.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["MAX_BUCKET", "bucket_of", "upper_bound_s", "p95_s"]

PER_DOUBLING = 8
MAX_BUCKET = 168


def bucket_of(seconds: float) -> int:
    """The bucket of a latency."""
    ms = seconds * 1000.0
    if ms <= 1.0:
        return 0
    return min(MAX_BUCKET, math.ceil(math.log2(ms) * PER_DOUBLING))


def upper_bound_s(bucket: int) -> float:
    """The largest latency in `bucket`, in seconds."""
    return 2.0 ** (bucket / PER_DOUBLING) / 1000.0


def p95_s(buckets: Iterable[tuple[int, int]]) -> float | None:
    """The 95th percentile of (bucket, count) pairs, in seconds; None without a count."""
    ordered = sorted(buckets)
    total = sum(count for _, count in ordered)
    if total == 0:
        return None
    rank, seen = math.ceil(0.95 * total), 0
    for bucket, count in ordered:
        seen += count
        if seen >= rank:
            return upper_bound_s(bucket)
    return upper_bound_s(ordered[-1][0])
