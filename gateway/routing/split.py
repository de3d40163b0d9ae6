"""Weighted choice among a route's arms: a random point, or a stable one per caller (sticky).

A point in [0, 1) falls on the arm whose share of the total weight covers it, arms in the order listed.
A sticky point is a hash of the route and the caller, the same on every replica and after a restart; a
caller keeps its arm while the weights stand (when they change, only the callers on the moved boundary move).
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence
from itertools import accumulate

__all__ = ["Weights", "stable_point"]

_SCALE = float(1 << 64)


def stable_point(route: str, who: str) -> float:
    """A point in [0, 1) for `who` on `route`, the same wherever and whenever it is computed."""
    digest = hashlib.blake2b(f"{route}\0{who}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


class Weights:
    """Arms' weights as the ends of their shares of [0, 1)."""

    __slots__ = ("_ends",)

    def __init__(self, weights: Sequence[int]) -> None:
        if not weights or min(weights) <= 0:
            raise ValueError("weights must be positive")
        total = sum(weights)
        self._ends = [end / total for end in accumulate(weights)]

    def arm(self, point: float) -> int:
        """The index of the arm `point` falls on."""
        return min(bisect.bisect_right(self._ends, point), len(self._ends) - 1)
