"""Credentials never reach a log: every LogRecord of the process is scrubbed before any handler sees it.

The scrubber is installed as logging's record factory, so it applies to every logger (aiohttp's
included) and to whatever handlers are attached (the stderr handler, pytest's caplog, a collector's).
A record's message is rendered once, there, and scrubbed of:

- credentials by their shape, since client keys are known only by their digests: the value of an
  `Authorization`, `Proxy-Authorization`, `api-key` or `x-api-key` header however it is quoted, and
  any `Bearer`/`Basic` token;
- the secrets of every running gateway (provider keys, configured header values), read when the record
  is made, so they follow config reloads;
- in the text of an aiohttp parser error (a malformed request line or header), every byte string:
  aiohttp quotes the raw line, which may hold a client key with nothing around it to recognise it by
  (an obs-folded header continues on a line of its own).

Logging is process-wide, so the scrubber is too: one instance, installed once; each running app adds
the source of its secrets and removes it when it stops.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError

from gateway.redact import Redactor

__all__ = ["LogScrubber", "LOG_SCRUBBER", "scrub_logs", "without_raw_bytes"]

REDACTED = "[redacted]"
_HEADER_VALUE = re.compile(
    r"""(?i)\b((?:proxy-)?authorization|x-api-key|api-key)(\s*['"]?\s*[:=]\s*['"]?)[^'"\r\n]*""")
_SCHEME_TOKEN = re.compile(r"""(?i)\b(bearer|basic)((?:\s|\\[rnt])+)[^\s'"]+""")
_BYTE_STRING = re.compile(r"""b'(?:[^'\\\n]|\\.)*'|b"(?:[^"\\\n]|\\.)*\"""")
_EXCEPTION_FORMATTER = logging.Formatter()


def _shapes(text: str) -> str:
    """`text` without header credentials and scheme tokens."""
    lower = text.lower()    # the patterns cost ~10 us a line; these look-ups ~0.5 us, and most lines have none
    if "authorization" in lower or "api-key" in lower:
        text = _HEADER_VALUE.sub(lambda m: f"{m[1]}{m[2]}{REDACTED}", text)
    if "bearer" in lower or "basic" in lower:
        text = _SCHEME_TOKEN.sub(lambda m: f"{m[1]}{m[2]}{REDACTED}", text)
    return text


def without_raw_bytes(text: str) -> str:
    """`text` with every quoted byte string (`b'...'`) replaced by a note that it was left out."""
    return _BYTE_STRING.sub("b'[raw request bytes not logged]'", text)


def _from_parser(error: BaseException | None) -> bool:
    """True when `error`, or an exception it was raised from, is an HTTP parser error."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, HttpProcessingError):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


class LogScrubber:
    """Scrubs the message, traceback and stack of every LogRecord made while it is installed."""

    def __init__(self) -> None:
        self._sources: dict[int, Callable[[], Redactor]] = {}
        self._make: Callable[..., logging.LogRecord] | None = None

    def install(self) -> None:
        """Become logging's record factory, wrapping the one in place (idempotent)."""
        if self._make is None:
            self._make = logging.getLogRecordFactory()
            logging.setLogRecordFactory(self._record)

    def follow(self, source: Callable[[], Redactor]) -> Callable[[], None]:
        """Also redact the secrets `source()` knows at each record; returns what stops that."""
        key = id(source)
        self._sources[key] = source

        def stop() -> None:
            self._sources.pop(key, None)

        return stop

    def text(self, text: str) -> str:
        """`text` without credentials of a known shape or any followed secret."""
        text = _shapes(text)
        for source in tuple(self._sources.values()):
            text = _redacted(source(), text)
        return text

    def _record(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        assert self._make is not None
        record = self._make(*args, **kwargs)
        try:
            self._scrub(record)
        except Exception:   # scrubbing must never break the call that logs; drop what could not be scrubbed
            record.msg, record.args, record.exc_info, record.exc_text = "[log line dropped: not scrubbable]", (), None, None
        return record

    def _scrub(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:    # bad arguments: keep the format only, as logging would report it
            message = f"{record.msg} (arguments that do not fit the format were left out)"
        record.msg, record.args = self.text(message), ()
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            trace = _EXCEPTION_FORMATTER.formatException(record.exc_info)
            if _from_parser(record.exc_info[1]):
                trace = without_raw_bytes(trace)
            record.exc_text = self.text(trace)
        if record.stack_info:
            record.stack_info = self.text(record.stack_info)


def _redacted(redactor: Redactor, text: str) -> str:
    """`redactor.text(text)`, also for text holding lone surrogates (undecodable bytes of a header)."""
    try:
        return redactor.text(text)
    except UnicodeEncodeError:
        return redactor.text(text.encode(errors="backslashreplace").decode())


LOG_SCRUBBER = LogScrubber()


def scrub_logs() -> LogScrubber:
    """The process's scrubber, installed."""
    LOG_SCRUBBER.install()
    return LOG_SCRUBBER
