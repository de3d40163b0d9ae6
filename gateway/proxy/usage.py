"""Reading token usage out of OpenAI-compatible answers."""

from __future__ import annotations

from typing import Any

from gateway.pricing import Usage

__all__ = ["usage_from"]


def _int(value: Any) -> int:
    return value if type(value) is int and value > 0 else 0   # not a bool, a float or a str


def usage_from(obj: Any) -> Usage | None:
    """The usage block of a response or chunk, or None when it has none."""
    if not isinstance(obj, dict):
        return None
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    cached = cached or _int(usage.get("prompt_cache_hit_tokens"))   # DeepSeek's name for it
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    if not completion and not prompt:
        prompt = _int(usage.get("total_tokens"))
    return Usage(prompt, completion, cached)
