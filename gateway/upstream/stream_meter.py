"""Metering a relayed stream, event by event: what it delivered, and when the gateway must end it.

The relay hands the SSE events of each chunk it reads to `admit`. Output is counted as it goes: from a usage
chunk sent along with the output when the upstream sends one, else one token per event that carries output
(the estimate charged when no usage arrives). Events are parsed only where counting cannot do without:

    before the first output      each event is parsed: role, filter and comment events carry none, so
                                 they are never counted
    within the reserved output   counted, not parsed (the hot path: a prefix, a search from the end for
                                 `"usage"`, a comparison)
    past it (+ EVENT_SLACK)      each event is parsed: one without output (a finish or filter chunk)
                                 passes; one with output ends the stream (`stream_budget_exhausted`)
    a usage chunk with output    its completion tokens past the reserved output, or its cost past the
                                 reserved amount, end the stream
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from gateway.config.model import ModelPrice
from gateway.domain.pricing import Usage, cost_nano
from gateway.domain.worst_case import WorstCase
from gateway.upstream.usage import UNREADABLE, usage_from

__all__ = ["StreamOutcome", "Capture", "admit", "carries_output", "EVENT_SLACK",
           "STREAM_TRUNCATED", "STREAM_BUDGET_EXHAUSTED", "STREAM_TIMEOUT"]

STREAM_TRUNCATED = "stream_truncated"                 # the upstream broke off
STREAM_BUDGET_EXHAUSTED = "stream_budget_exhausted"   # the stream passed what its request reserved
STREAM_TIMEOUT = "stream_timeout"                     # the stream ran past its provider's stream_s
EVENT_SLACK = 1   # output events past the reserved output: one event without tokens mid-stream is no runaway
_DONE = b"data: [DONE]"
_DATA_JSON = b"data: {"
_USAGE = b'"usage"'
_NULL = (b":null", b": null")      # what follows `"usage"` when a chunk has no usage block
_OUTPUT_FIELDS = frozenset(("content", "text", "tool_calls", "function_call", "refusal", "reasoning_content",
                            "reasoning", "audio"))


class Capture(Protocol):
    """Takes a copy of what is relayed (the response cache joins it into the whole answer)."""

    def feed(self, data: bytes) -> None:
        """The bytes just written to the client."""


@dataclass
class StreamOutcome:
    """What a relayed stream delivered (usage when the upstream sent it, else an estimate), within its request's
    worst case: its output cap (max_tokens x n, or the policy or model cap) and the amount it reserved."""

    worst: WorstCase
    price: ModelPrice                # of the model serving it
    usage: Usage | None = None
    partial: Usage | None = None     # usage known before the end (Anthropic's message_start: the input side)
    usage_unreadable: bool = False   # a usage chunk that could not be read: the usage is unknown
    content_events: int = 0          # events that carried output, from the first one on (the estimate)
    # Events are counted without parsing them while content_events < event_cap; the others are parsed:
    # before the first output event (-1: role and filter chunks are free) and past the reserved output.
    event_cap: int = -1
    complete: bool = False           # [DONE] was relayed
    client_gone: bool = False
    ended_by: str | None = None      # the code of the error event that ended the stream, if one did
    first_write_at: float | None = None   # perf_counter() when the first event went to the client
    capture: Capture | None = None   # fed what the client is sent


def admit(events: list[bytes], outcome: StreamOutcome, wants_usage: bool) -> list[bytes]:
    """The events the client may see, each metered into `outcome`, up to one that ends the stream.

    The hot path (an event of JSON without usage, within the reserved output) is a prefix check, a byte
    search from the end, a comparison and an increment, inlined in this loop; only the few other events
    are parsed.
    """
    passed = []
    for event in events:
        if not event.startswith(_DATA_JSON):
            keep = _unusual(event, outcome, wants_usage)
        elif (at := event.rfind(_USAGE)) >= 0 and not event.startswith(_NULL, at + 7):   # see _has_usage
            keep = _with_usage(event, outcome, wants_usage)
        elif outcome.content_events < outcome.event_cap:
            outcome.content_events += 1
            keep = True
        else:
            keep = _checked(event, None, outcome)
        if keep:
            passed.append(event)
        elif outcome.ended_by is not None:
            break
    return passed


def _unusual(event: bytes, outcome: StreamOutcome, wants_usage: bool) -> bool:
    """An event that is not `data: {...`: [DONE], a comment (keep-alive), or data written another way."""
    if event.startswith(_DONE):
        outcome.complete = True
        return True
    if b"data:" not in event:                # no data, so no output
        return True
    if _has_usage(event):
        return _with_usage(event, outcome, wants_usage)
    return _counted(event, None, outcome)


def _has_usage(event: bytes) -> bool:
    """Whether an event has a usage block that is not null: its last `"usage"` is not followed by null.

    Searched from the end, where providers put it; a chunk with another `"usage"` nested before it is
    parsed when its last one is not null, and usage_from reads only the top-level block.
    """
    at = event.rfind(_USAGE)
    return at >= 0 and not event.startswith(_NULL, at + 7)


def _with_usage(event: bytes, outcome: StreamOutcome, wants_usage: bool) -> bool:
    """An event with a usage block: read it; a usage-only chunk reaches the client only if it asked."""
    chunk = _json(event)
    if isinstance(chunk, dict):
        _read_usage(chunk, outcome)
        if outcome.ended_by is not None:
            return False
        if not chunk.get("choices"):
            return wants_usage
    return _counted(event, chunk, outcome)


def _counted(event: bytes, chunk: Any, outcome: StreamOutcome) -> bool:
    """Count an event as output while within the reserved output; check it otherwise (see `_checked`)."""
    if outcome.content_events < outcome.event_cap:
        outcome.content_events += 1
        return True
    return _checked(event, chunk, outcome)


def _json(event: bytes) -> Any:
    """The JSON of an event's data, or None."""
    try:
        return orjson.loads(event[event.index(b"{"):])
    except ValueError:                       # no JSON object (a comment line), or not valid JSON
        return None


def _read_usage(chunk: dict[str, Any], outcome: StreamOutcome) -> None:
    """Keep a usage chunk's counts; one that runs along with output past what was reserved ends the stream
    (undelivered, so the usage kept is the last one delivered)."""
    usage = usage_from(chunk)
    if usage is UNREADABLE:
        outcome.usage_unreadable = True
    elif isinstance(usage, Usage):
        worst = outcome.worst
        if chunk.get("choices") and (usage.completion_tokens > worst.usage.completion_tokens
                                     or cost_nano(outcome.price, usage) > worst.amount.usd_nano):
            outcome.ended_by = STREAM_BUDGET_EXHAUSTED
        else:
            outcome.usage = usage


def _checked(event: bytes, chunk: Any, outcome: StreamOutcome) -> bool:
    """An event parsed for output: before the first output it is free, past the reserved output it ends the stream.

    Events without output (the role chunk, finish and content-filter chunks, comments) always pass.
    """
    if not carries_output(_json(event) if chunk is None else chunk):
        return True
    if outcome.event_cap < 0:                # the first output: counting starts
        outcome.event_cap = outcome.worst.usage.completion_tokens + EVENT_SLACK
        outcome.content_events += 1
        return True
    outcome.ended_by = STREAM_BUDGET_EXHAUSTED
    return False


def carries_output(chunk: Any) -> bool:
    """Whether a chunk's choices hold generated output (text, tool calls, reasoning): what costs tokens."""
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if isinstance(choice, dict):
            delta = choice.get("delta")
            part = delta if isinstance(delta, dict) else choice   # /v1/completions: text on the choice
            for name, value in part.items():   # (a delta holds a field or two: fewer steps than the names)
                if value and name in _OUTPUT_FIELDS:
                    return True
    return False
