"""Reading token usage out of OpenAI-compatible answers: read exactly, or unknown, never zero.

A count is a non-negative integer (an integral float such as 500.0 is one) below 2**53. Anything else
in a field the charge needs (a string, a bool, a list, a negative or fractional number, null, 1e30)
makes the whole usage UNREADABLE: the caller charges its own bound instead and says so. So does a
block of zero tokens: every answered request read a prompt, so zero is a relay that does not count.

    prompt_tokens       required, except in a total-only block ({"total_tokens": N}, some embedders)
    completion_tokens   required, else total_tokens - prompt_tokens (embeddings send only the two)
    cached tokens       prompt_tokens_details.cached_tokens, or DeepSeek's prompt_cache_hit_tokens;
                        absent or null: none
"""

from __future__ import annotations

from typing import Any, Final

from gateway.domain.pricing import Usage

__all__ = ["UNREADABLE", "Unreadable", "ReadUsage", "usage_from", "count", "optional_count"]

MAX_COUNT = 2**53 - 1   # beyond it a JSON number is no exact integer (and no answer is that long)


class Unreadable:
    """The marker of a usage block that is there but cannot be read as counts."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNREADABLE"


UNREADABLE: Final = Unreadable()
ReadUsage = Usage | Unreadable | None
"""A usage block read: counts, UNREADABLE, or None when the answer has no usage block (or `"usage": null`)."""


class _Bad(ValueError):
    """A field that is not a count."""


def _count(value: Any) -> int:
    """A token count, or _Bad."""
    if type(value) is int:                   # not a bool
        if 0 <= value <= MAX_COUNT:
            return value
    elif type(value) is float and value.is_integer() and 0 <= value <= MAX_COUNT:
        return int(value)
    raise _Bad


def count(value: Any) -> int:
    """A token count; ValueError when `value` is not one."""
    return _count(value)


def optional_count(value: Any) -> int:
    """A token count that may be absent (None: 0); ValueError when `value` is something else."""
    return 0 if value is None else _count(value)


def _cached(usage: dict[str, Any]) -> int:
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if cached is None:
        cached = usage.get("prompt_cache_hit_tokens")   # DeepSeek's name for it
    return 0 if cached is None else _count(cached)


def _counts(usage: dict[str, Any]) -> Usage:
    """Prompt, completion and cached counts of a usage block, or _Bad."""
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if type(prompt) is int and type(completion) is int and 0 <= prompt <= MAX_COUNT and 0 <= completion <= MAX_COUNT:
        return Usage(prompt, completion, _cached(usage))   # the usual block: `_count` of each, inlined
    if "prompt_tokens" not in usage and "completion_tokens" not in usage:
        return Usage(_count(usage.get("total_tokens")))   # a total-only block: all of it is prompt
    prompt = _count(usage.get("prompt_tokens"))
    if "completion_tokens" in usage:
        completion = _count(usage["completion_tokens"])
    else:
        completion = _count(usage.get("total_tokens")) - prompt
        if completion < 0:
            raise _Bad
    return Usage(prompt, completion, _cached(usage))


def usage_from(obj: Any) -> ReadUsage:
    """The usage block of a response or chunk: counts, UNREADABLE, or None when it has none."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if usage is None:
        return None
    if not isinstance(usage, dict):
        return UNREADABLE
    try:
        counts = _counts(usage)
    except _Bad:
        return UNREADABLE
    return counts if counts.prompt_tokens or counts.completion_tokens else UNREADABLE
