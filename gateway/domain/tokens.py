"""Token counts the gateway works out itself, without a tokenizer on the hot path.

Prompt upper bound (for reservations): a BPE token always covers at least one byte of text, so the
UTF-8 byte length of every string in the prompt, plus a per-message overhead, bounds the real
token count from above. Image parts are bounded by a fixed allowance each; `file` and `input_audio`
parts by the byte length of their data (base64 or text), and never less than that allowance. The
fields that reach the model beside the prompt (`response_format`, `prediction`, `tools`,
`functions`, `tool_choice`) count with the byte length of their JSON. A body nested too deeply to
walk is an InvalidRequest.

Completion estimate (for a stream that ended without usage): providers stream about one token per
content event, so the number of events that carried choices is the estimate; such records are
marked `estimated`.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.errors import InvalidRequest

__all__ = ["prompt_upper_bound", "MESSAGE_OVERHEAD_TOKENS", "NON_TEXT_PART_TOKENS", "EXTRA_PROMPT_FIELDS"]

MESSAGE_OVERHEAD_TOKENS = 8
NON_TEXT_PART_TOKENS = 2_000
EXTRA_PROMPT_FIELDS = ("response_format", "prediction", "tools", "functions", "tool_choice")
_TEXT_KINDS = ("text", "input_text", "function")
_DATA_KINDS = ("file", "input_audio")     # bounded by the bytes of their data


def _text_bytes(value: Any) -> int:
    """Upper bound of tokens in any JSON value: bytes of its strings, allowances for media parts."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode())
    if isinstance(value, list):
        return sum(_text_bytes(item) for item in value)
    if isinstance(value, dict):
        kind = value.get("type")
        if kind in _DATA_KINDS:
            return max(NON_TEXT_PART_TOKENS, _strings_bytes(value))
        if kind is not None and kind not in _TEXT_KINDS:
            return NON_TEXT_PART_TOKENS
        return _strings_bytes(value)
    return 1 if value is not None else 0


def _strings_bytes(part: dict[str, Any]) -> int:
    """The bound of every value of a dict."""
    return sum(_text_bytes(item) for item in part.values())


def _json_bytes(payload: dict[str, Any]) -> int:
    """Bytes of the JSON of the fields sent to the model beside the prompt."""
    total = 0
    for name in EXTRA_PROMPT_FIELDS:
        if name in payload:
            total += len(orjson.dumps(payload[name]))
    return total


def _messages_bytes(messages: list[Any]) -> int:
    """`_text_bytes` of a chat message list, with the usual message (text fields only) counted inline."""
    total = 0
    for message in messages:
        if type(message) is not dict or "type" in message:
            total += _text_bytes(message)
            continue
        for item in message.values():
            if type(item) is str:
                total += len(item) if item.isascii() else len(item.encode())
            else:
                total += _text_bytes(item)
    return total


def _prompt_bytes(payload: dict[str, Any]) -> int:
    """The bound of the messages, prompt or input, with their per-message overhead."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        return _messages_bytes(messages) + MESSAGE_OVERHEAD_TOKENS * len(messages)
    for field in ("prompt", "input"):
        if field in payload:
            return _text_bytes(payload[field]) + MESSAGE_OVERHEAD_TOKENS
    return MESSAGE_OVERHEAD_TOKENS


def prompt_upper_bound(payload: dict[str, Any]) -> int:
    """An upper bound of the prompt tokens of a chat, completion or embedding request."""
    try:
        return _prompt_bytes(payload) + _json_bytes(payload)
    except (RecursionError, orjson.JSONEncodeError):
        raise InvalidRequest("The request body is nested too deeply.") from None
