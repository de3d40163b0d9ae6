"""Metering Responses and Messages streams, and their Dialects (see gateway.upstream.dialect).

Both APIs name each event (`event: <type>`, the type again in the data's `"type"`); the meter reads the name
and parses only the few events that carry usage:

    responses   `*.delta` events carry output (one token each, as chat chunks do); `response.completed` and
                `response.incomplete` end the stream with the final usage (`response.usage`);
                `response.failed` ends it too when it carries usage
    messages    `content_block_delta` carries output; `message_start` holds the input side of the usage
                (input, cache reads and writes: charged even when the stream is cut), `message_delta` the
                final output count; `message_stop` ends the stream

Past the reserved output (+ EVENT_SLACK) an output event ends the stream (`stream_budget_exhausted`). The
gateway's own endings are each API's error event: Responses `event: error` with `type`, `code`, `message`
(plus an `error` object, which is what the openai SDK raises on); Messages `event: error` with
`{"type": "error", "error": {"type", "message"}}`, on which the anthropic SDK raises.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.domain.pricing import Usage
from gateway.upstream.api_usage import messages_usage, messages_usage_block, responses_usage, responses_usage_block
from gateway.upstream.dialect import CHAT, ENDINGS, Dialect
from gateway.upstream.stream_meter import EVENT_SLACK, STREAM_BUDGET_EXHAUSTED, StreamOutcome
from gateway.upstream.usage import UNREADABLE, ReadUsage

__all__ = ["RESPONSES_DIALECT", "MESSAGES_DIALECT", "DIALECTS", "admit_responses", "admit_messages", "event_type"]

_EVENT = b"event:"
_DELTA = b".delta"
_RESPONSE_ENDS = (b"response.completed", b"response.incomplete")
_FAILED = b"response.failed"
_ANTHROPIC_TYPES = {"upstream_error": "api_error", "budget_exceeded": "rate_limit_error"}


def event_type(event: bytes) -> bytes:
    """The event's name: its `event:` line, else the `type` of its data (b"" when it has neither)."""
    if event.startswith(_EVENT):
        return event[6:event.find(b"\n")].strip()
    data = _data(event)
    kind = data.get("type") if isinstance(data, dict) else None
    return kind.encode() if isinstance(kind, str) else b""


def _data(event: bytes) -> Any:
    """The JSON of an event's data, or None."""
    at = event.find(b"data:")
    if at < 0:
        return None
    try:
        return orjson.loads(event[at + 5:])
    except orjson.JSONDecodeError:
        return None


def _output(outcome: StreamOutcome) -> bool:
    """Count one output event; False (the stream ends) when it is past the reserved output."""
    if outcome.content_events >= outcome.worst.usage.completion_tokens + EVENT_SLACK:
        outcome.ended_by = STREAM_BUDGET_EXHAUSTED
        return False
    outcome.content_events += 1
    return True


def _keep_usage(outcome: StreamOutcome, usage: ReadUsage) -> None:
    """Record a final usage block."""
    if usage is UNREADABLE:
        outcome.usage_unreadable = True
    elif isinstance(usage, Usage):
        outcome.usage = usage


def admit_responses(events: list[bytes], outcome: StreamOutcome, wants_usage: bool) -> list[bytes]:
    """The Responses events the client may see, each metered into `outcome`, up to one that ends the stream."""
    passed = []
    for event in events:
        kind = event_type(event)
        if kind.endswith(_DELTA):
            if not _output(outcome):
                break
        elif kind in _RESPONSE_ENDS or kind == _FAILED:
            data = _data(event)
            response = data.get("response") if isinstance(data, dict) else None
            usage = responses_usage_block(response.get("usage")) if isinstance(response, dict) else UNREADABLE
            _keep_usage(outcome, usage)
            outcome.complete = kind != _FAILED or isinstance(usage, Usage)
        passed.append(event)
    return passed


def admit_messages(events: list[bytes], outcome: StreamOutcome, wants_usage: bool) -> list[bytes]:
    """The Messages events the client may see, each metered into `outcome`, up to one that ends the stream."""
    passed = []
    for event in events:
        kind = event_type(event)
        if kind == b"content_block_delta":
            if not _output(outcome):
                break
        elif kind == b"message_start":
            _started(event, outcome)
        elif kind == b"message_delta":
            _delta_usage(event, outcome)
        elif kind == b"message_stop":
            outcome.complete = True
        passed.append(event)
    return passed


def _started(event: bytes, outcome: StreamOutcome) -> None:
    """message_start: the input side of the usage (and one output token, as Anthropic reports it)."""
    data = _data(event)
    usage = messages_usage(data.get("message")) if isinstance(data, dict) else UNREADABLE
    if isinstance(usage, Usage):
        outcome.partial = usage
    elif usage is UNREADABLE:
        outcome.usage_unreadable = True


def _delta_usage(event: bytes, outcome: StreamOutcome) -> None:
    """message_delta: the final output count (cumulative); the input side from message_start unless it repeats it
    (the 1-hour writes from message_start unless it tells them)."""
    data = _data(event)
    block = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(block, dict):
        _keep_usage(outcome, UNREADABLE if block is not None or data is None else None)
        return
    start = outcome.partial
    if start is not None:
        by_ttl = {"ephemeral_1h_input_tokens": start.cache_write_1h_tokens}
        if block.get("input_tokens") is None:
            start_block = {"input_tokens": start.prompt_tokens - start.cached_tokens - start.cache_write_tokens,
                           "cache_read_input_tokens": start.cached_tokens,
                           "cache_creation_input_tokens": start.cache_write_tokens, "cache_creation": by_ttl}
            block = {**start_block, **{name: value for name, value in block.items() if value is not None}}
        elif block.get("cache_creation") is None and start.cache_write_1h_tokens:
            block = {**block, "cache_creation": by_ttl}      # the writes' times to live, told at the start
    _keep_usage(outcome, messages_usage_block(block))


def _responses_error(code: str, type_: str, message: str) -> bytes:
    """A Responses `error` event; its `error` object makes the openai SDK raise."""
    error = {"type": type_, "code": code, "message": message, "param": None}
    data = {"type": "error", "code": code, "message": message, "param": None, "error": error}
    return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"


def _messages_error(code: str, type_: str, message: str) -> bytes:
    """A Messages `error` event, on which the anthropic SDK raises."""
    data = {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(type_, "api_error"), "message": message}}
    return b"event: error\ndata: " + orjson.dumps(data) + b"\n\n"


RESPONSES_DIALECT = Dialect(responses_usage, admit_responses,
                            {code: _responses_error(code, type_, message) for code, type_, message in ENDINGS})
MESSAGES_DIALECT = Dialect(messages_usage, admit_messages,
                           {code: _messages_error(code, type_, message) for code, type_, message in ENDINGS})
DIALECTS = {"openai-chat": CHAT, "openai-responses": RESPONSES_DIALECT, "anthropic-messages": MESSAGES_DIALECT}
"""The Dialect of each API a provider may serve."""
