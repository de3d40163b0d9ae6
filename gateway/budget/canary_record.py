"""A canary's shared state as the store keeps it: its step, status, and what each arm did in that step.

Every replica adds what its requests did (`ArmTally`, summed locally and sent now and then) and reads the
whole record back in the same store operation (`BudgetStore.canary_sync`); a step changes only by a
compare-and-set on the step (`BudgetStore.canary_move`), so replicas never disagree on it in the store.
In storage a record is a flat map of integer fields (`tally_fields`, `record_of`), the same on every backend.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, NamedTuple

__all__ = ["CanaryStatus", "RAMPING", "PROMOTED", "ROLLED_BACK", "STATUSES", "ArmTally", "CanaryRecord",
           "tally_fields", "record_of", "fields_of", "check_canary_move"]

CanaryStatus = Literal["ramping", "promoted", "rolled_back"]
RAMPING: CanaryStatus = "ramping"
PROMOTED: CanaryStatus = "promoted"
ROLLED_BACK: CanaryStatus = "rolled_back"
STATUSES: tuple[CanaryStatus, ...] = (RAMPING, PROMOTED, ROLLED_BACK)


class ArmTally(NamedTuple):
    """What one arm's requests did: how many, how many failed, the cost and latency of those served.

    `latency` counts answers per latency bucket (see gateway.routing.latency), as (bucket, count) pairs.
    """

    requests: int = 0
    errors: int = 0
    cost_nano: int = 0
    latency: tuple[tuple[int, int], ...] = ()

    def __add__(self, other: object) -> ArmTally:   # type: ignore[override]
        """Two tallies summed."""
        assert isinstance(other, ArmTally)
        buckets = dict(self.latency)
        for bucket, count in other.latency:
            buckets[bucket] = buckets.get(bucket, 0) + count
        return ArmTally(self.requests + other.requests, self.errors + other.errors,
                        self.cost_nano + other.cost_nano, tuple(sorted(buckets.items())))


class CanaryRecord(NamedTuple):
    """A canary's state in the store: the step index, its status, when the step began, and the arms' tallies in it.

    `arms` is (control, candidate).
    """

    step: int
    status: CanaryStatus
    since: float
    arms: tuple[ArmTally, ArmTally] = (ArmTally(), ArmTally())


def tally_fields(tallies: Sequence[ArmTally]) -> list[tuple[str, int]]:
    """The non-zero fields the tallies add, arm by arm: `<arm>r` requests, `<arm>e` errors, `<arm>c` cost,
    `<arm>l<bucket>` latency counts."""
    fields: list[tuple[str, int]] = []
    for arm, tally in enumerate(tallies):
        for name, value in (("r", tally.requests), ("e", tally.errors), ("c", tally.cost_nano)):
            if value:
                fields.append((f"{arm}{name}", value))
        fields += [(f"{arm}l{bucket}", count) for bucket, count in tally.latency if count]
    return fields


def record_of(step: int, status: str, since: float, fields: Iterable[tuple[str, int]]) -> CanaryRecord:
    """The record of a stored step, status, start and tally fields."""
    arms: list[dict[str, int]] = [{}, {}]
    latency: list[dict[int, int]] = [{}, {}]
    for name, value in fields:
        arm = int(name[0])
        if name[1] == "l":
            latency[arm][int(name[2:])] = int(value)
        else:
            arms[arm][name[1]] = int(value)
    tallies = tuple(ArmTally(a.get("r", 0), a.get("e", 0), a.get("c", 0), tuple(sorted(b.items())))
                    for a, b in zip(arms, latency))
    if status not in STATUSES:
        raise ValueError(f"unknown canary status {status!r}")
    return CanaryRecord(step, status, since, (tallies[0], tallies[1]))   # type: ignore[arg-type]


def check_canary_move(from_step: int, to_step: int, status: str) -> None:
    """Raise ValueError for a step that goes back or a status that is not one."""
    if status not in STATUSES or to_step < from_step or from_step < 0:
        raise ValueError(f"not a canary move: step {from_step} -> {to_step}, status {status!r}")


def fields_of(mapping: Mapping[str, int]) -> list[tuple[str, int]]:
    """The tally fields of a stored mapping (its other keys left out)."""
    return [(name, value) for name, value in mapping.items() if name[:1] in ("0", "1")]
