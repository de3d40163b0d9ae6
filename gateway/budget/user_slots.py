"""`each: user`: the counters of one end user, made from a match's shared slots per request.

A (caller, model) pair's slots are cached (gateway.budget.slots) without an end user; a request that
matches an `each: user` policy gets its own copy of that policy's slots, each counter named for its user
(`<window>@<user>`). A per-user budget counter expires `slots.USER_KEY_GRACE_S` after its window, not the 35 days
a shared one keeps for last month's report: idle users leave nothing behind once their window is over,
so the store holds counters of the users active in the current windows only.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, TypeVar

from gateway.budget.rate_windows import with_each
from gateway.budget.rate_slots import RateSlot
from gateway.config.model import Policy
from gateway.errors import InvalidRequest

__all__ = ["ANONYMOUS", "user_slots", "user_value"]

if TYPE_CHECKING:
    from gateway.budget.slots import BudgetSlot

S = TypeVar("S", bound="BudgetSlot | RateSlot")
ANONYMOUS = "anonymous"       # `without_user: anonymous`: requests without an end user share this one


def user_value(policy: Policy, user: str | None) -> str:
    """The end user `policy` counts the request under; a 400 when there is none and the policy refuses that."""
    if user is not None:
        return user
    if policy.without_user == "anonymous":
        return ANONYMOUS
    raise InvalidRequest(f"Policy '{policy.name}' limits each end user: send the OpenAI 'user' field or an "
                         "'x-gateway-user' header.", code="end_user_required", param="user")


def user_slots(slots: tuple[S, ...], user: str | None) -> tuple[S, ...]:
    """`slots` with the counters of `each: user` policies named for `user`."""
    return tuple([_for_user(slot, user) if slot.policy is not None and slot.policy.each == "user" else slot
                  for slot in slots])


def _for_user(slot: S, user: str | None) -> S:
    assert slot.policy is not None
    counter = slot.counter
    value = user_value(slot.policy, user)
    return dataclasses.replace(slot, counter=counter._replace(window_id=with_each(counter.window_id, value)))
