"""One JSON access-log line per request: who, which model served it, where, what it cost. Never a key or a prompt."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from random import Random

import orjson

from gateway.domain.pricing import Usage, format_usd

__all__ = ["AccessRecord", "AccessLog", "new_request_id"]


# Seeded from os.urandom here and again in a forked child; its own, so no random.seed() elsewhere can make
# two processes draw the same ids. Unlike os.urandom it costs no system call per id: ids must be unique,
# not secret.
_ids = Random()
os.register_at_fork(after_in_child=_ids.seed)


def new_request_id() -> str:
    """32 random hex digits (128 bits, like a UUID4's hex), unique across replicas and restarts."""
    return _ids.getrandbits(128).to_bytes(16, "big").hex()


@dataclass
class AccessRecord:
    """What the gateway learned about one request while serving it."""

    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.perf_counter)
    caller: str | None = None
    model: str | None = None                 # the model that served (or was to serve) the request
    requested_model: str | None = None       # the model the client asked for
    route: str | None = None                 # the route pattern that served the model (a bounded label)
    policies: tuple[str, ...] = ()           # budget policies the request was matched and charged against
    downgraded_from: str | None = None
    provider: str | None = None
    status: int = 0
    usage: Usage | None = None
    cost_nano: int | None = None
    usage_unknown: str | None = None         # why the upstream's usage was not charged (gateway.upstream.charging)
    attempts: int = 0
    stream: bool = False
    first_byte_s: float | None = None        # streams: seconds from arrival to the first relayed event
    error: str | None = None
    cache: str | None = None                 # the response cache's lookup: hit, miss, bypass or error
    saved_nano: int = 0                      # a cache hit: what the cached answer cost when it was bought
    rate_skipped: tuple[str, ...] = ()       # providers skipped at their own rate limit
    endpoint: str | None = None              # the forwarded endpoint's kind (chat, responses, messages, ...)
    user: str | None = None                  # the end user and session: ledgered, not logged (personal data)
    session: str | None = None

    def line(self, option: int = 0) -> bytes:
        """The JSON log line (`option`: orjson's, such as OPT_APPEND_NEWLINE)."""
        usage = self.usage
        # int(x * 10^k + 0.5) / 10^k: half up (x >= 0), for a fraction of round(x, k)'s cost
        return orjson.dumps({
            "ts": int(time.time() * 1000 + 0.5) / 1000,
            "request_id": self.request_id,
            "method": self.method,
            "path": self.path,
            "caller": self.caller,
            "model": self.model,
            "requested_model": self.requested_model,
            "downgraded_from": self.downgraded_from,
            "policies": self.policies,
            "provider": self.provider,
            "status": self.status,
            "stream": self.stream,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "completion_tokens": usage.completion_tokens if usage else None,
            "cached_tokens": usage.cached_tokens if usage else None,
            "usage_estimated": usage.estimated if usage else None,
            "usage_unknown": self.usage_unknown,
            "cost_usd": format_usd(self.cost_nano) if self.cost_nano is not None else None,
            "latency_ms": int((time.perf_counter() - self.started) * 100_000 + 0.5) / 100,
            "attempts": self.attempts,
            "error": self.error,
            "cache": self.cache,
            "saved_usd": format_usd(self.saved_nano) if self.saved_nano else None,
        }, option=option)


class AccessLog:
    """Writes access records to the `gateway.access` logger, or straight to `sink` (one line each).

    The gateway command gives the sink of its stderr log handler: a busy gateway writes a line per
    request, and a LogRecord per line costs more than the line itself. Embedded in another program,
    the gateway logs through `logging` like anything else.
    """

    def __init__(self, enabled: bool = True, logger: logging.Logger | None = None,
                 sink: Callable[[bytes], None] | None = None) -> None:
        self.enabled = enabled
        self.logger = logger or logging.getLogger("gateway.access")
        self._sink = sink

    def write(self, record: AccessRecord) -> None:
        """Write the record's line at INFO (the caller's file and line are not looked up: they never change)."""
        if not self.enabled:
            return
        if self._sink is not None:
            self._sink(record.line(orjson.OPT_APPEND_NEWLINE))
            return
        logger = self.logger
        if logger.isEnabledFor(logging.INFO):
            line = record.line().decode()
            logger.handle(logger.makeRecord(logger.name, logging.INFO, __file__, 0, line, (), None))
