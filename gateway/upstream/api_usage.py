"""Reading token usage out of Responses and Messages answers: read exactly, or unknown, never zero.

The rules of gateway.upstream.usage hold (a count is a non-negative integer below 2**53; anything else in a
field the charge needs makes the usage UNREADABLE, and so does a block of zero tokens):

    responses   usage.input_tokens (required; includes the cached ones), usage.output_tokens (required),
                usage.input_tokens_details.cached_tokens (absent or null: none)
    messages    usage.input_tokens (required; excludes cache reads and writes), usage.output_tokens
                (required), usage.cache_read_input_tokens and usage.cache_creation_input_tokens (absent
                or null: none), usage.cache_creation.ephemeral_5m/1h_input_tokens (the writes by time
                to live: the 1-hour ones cost more; their sum, when larger, is the writes). The prompt
                charged is input + cache reads + cache writes.
"""

from __future__ import annotations

from typing import Any

from gateway.domain.pricing import Usage
from gateway.upstream.usage import UNREADABLE, ReadUsage, count, optional_count

__all__ = ["responses_usage", "messages_usage", "responses_usage_block", "messages_usage_block", "known"]


def known(usage: Usage) -> ReadUsage:
    """`usage`, or UNREADABLE when it counts no token at all (a relay that does not count)."""
    return usage if usage.prompt_tokens or usage.completion_tokens else UNREADABLE


def responses_usage_block(usage: Any) -> ReadUsage:
    """The counts of a Responses `usage` block (None: null or absent)."""
    if usage is None:
        return None
    if not isinstance(usage, dict):
        return UNREADABLE
    try:
        details = usage.get("input_tokens_details")
        cached = optional_count(details.get("cached_tokens") if isinstance(details, dict) else None)
        prompt = count(usage.get("input_tokens"))
        return known(Usage(prompt, count(usage.get("output_tokens")), min(cached, prompt)))
    except ValueError:
        return UNREADABLE


def messages_usage_block(usage: Any) -> ReadUsage:
    """The counts of a Messages `usage` block (None: null or absent)."""
    if usage is None:
        return None
    if not isinstance(usage, dict):
        return UNREADABLE
    try:
        read = optional_count(usage.get("cache_read_input_tokens"))
        written = optional_count(usage.get("cache_creation_input_tokens"))
        written_1h = 0
        creation = usage.get("cache_creation")
        if creation is not None:          # the writes by time to live: a count on its own may leave some out
            if not isinstance(creation, dict):
                raise ValueError
            written_1h = optional_count(creation.get("ephemeral_1h_input_tokens"))
            written = max(written, optional_count(creation.get("ephemeral_5m_input_tokens")) + written_1h)
        prompt = count(usage.get("input_tokens")) + read + written
        return known(Usage(prompt, count(usage.get("output_tokens")), read, False, written, written_1h))
    except ValueError:
        return UNREADABLE


def responses_usage(answer: Any) -> ReadUsage:
    """The usage of a whole Responses answer (a `response` object)."""
    return responses_usage_block(answer.get("usage")) if isinstance(answer, dict) else None


def messages_usage(answer: Any) -> ReadUsage:
    """The usage of a whole Messages answer (a `message` object)."""
    return messages_usage_block(answer.get("usage")) if isinstance(answer, dict) else None
