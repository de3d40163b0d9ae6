"""What differs between the wire APIs the gateway relays: how usage is read, how a stream is metered, and how
the gateway's own stream endings are shaped. Each endpoint's API has one Dialect; OpenAI chat's is CHAT."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import orjson

from gateway.errors import error_body
from gateway.upstream.stream_meter import (
    STREAM_BUDGET_EXHAUSTED, STREAM_TIMEOUT, STREAM_TRUNCATED, StreamOutcome, admit,
)
from gateway.upstream.usage import ReadUsage, usage_from

__all__ = ["Dialect", "ENDINGS", "CHAT"]

ENDINGS = (
    (STREAM_TRUNCATED, "upstream_error",
     "The upstream stream ended before it was complete; the answer is truncated."),
    (STREAM_BUDGET_EXHAUSTED, "budget_exceeded",
     "The stream reached the output its request reserved (max_tokens x n, else the policy's or the model's "
     "max_output_tokens); the gateway ended it."),
    (STREAM_TIMEOUT, "upstream_error", "The stream ran longer than its provider's stream_s; the gateway ended it."),
)
"""The gateway's own stream endings: (code, OpenAI error type, message)."""


class Dialect(NamedTuple):
    """One wire API: the usage of a whole answer, the stream meter, and the error event of each ending."""

    usage_from: Callable[[Any], ReadUsage]                             # of a whole answer's top-level object
    admit: Callable[[list[bytes], StreamOutcome, bool], list[bytes]]   # see gateway.upstream.stream_meter
    error_events: Mapping[str, bytes]                                  # by ending code


CHAT = Dialect(usage_from, admit, {code: b"data: " + orjson.dumps(error_body(message, type_, code)) + b"\n\n"
                                   for code, type_, message in ENDINGS})
"""OpenAI's chat, completions and embeddings."""
