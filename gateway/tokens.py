"""Token counts the gateway works out itself, without a tokenizer on the hot path.

Prompt upper bound (for reservations): a BPE token always covers at least one byte of text, so the
UTF-8 byte length of every string in the prompt, plus a per-message overhead, bounds the real
token count from above. Non-text parts (images, audio) are bounded by a fixed allowance each.

Completion estimate (for a stream that ended without usage): providers stream about one token per
content event, so the number of events that carried choices is the estimate; such records are
marked `estimated`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["prompt_upper_bound", "MESSAGE_OVERHEAD_TOKENS", "NON_TEXT_PART_TOKENS"]

MESSAGE_OVERHEAD_TOKENS = 8
NON_TEXT_PART_TOKENS = 2_000


def _text_bytes(value: Any) -> int:
    """Upper bound of tokens in any JSON value: bytes of its strings, allowances for media parts."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode())
    if isinstance(value, list):
        return sum(_text_bytes(item) for item in value)
    if isinstance(value, dict):
        kind = value.get("type")
        if kind is not None and kind not in ("text", "input_text", "function"):
            return NON_TEXT_PART_TOKENS
        return sum(_text_bytes(item) for item in value.values())
    return 1 if value is not None else 0


def prompt_upper_bound(payload: dict[str, Any]) -> int:
    """An upper bound of the prompt tokens of a chat, completion or embedding request."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        bound = _text_bytes(messages) + MESSAGE_OVERHEAD_TOKENS * len(messages)
        return bound + _text_bytes(payload.get("tools")) + _text_bytes(payload.get("functions"))
    for field in ("prompt", "input"):
        if field in payload:
            return _text_bytes(payload[field]) + MESSAGE_OVERHEAD_TOKENS
    return MESSAGE_OVERHEAD_TOKENS
