"""Where log lines go: plain messages on stderr, written in batches.

A busy gateway logs one access line per request; flushing each line on its own costs a write system
call per request. Lines go through a buffer instead, flushed FLUSH_DELAY_S after the first line that
found it empty (or at once outside the event loop, or when the buffer is full), so a line is never
held back longer than that.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import sys
from typing import TextIO

from gateway.log_scrub import scrub_logs

__all__ = ["MessageFormatter", "LoopFlushedStreamHandler", "configure_logging", "stderr_handler"]

BUFFER_BYTES = 1 << 16
FLUSH_DELAY_S = 0.01


class MessageFormatter(logging.Formatter):
    """`%(message)s`, without the generic formatting steps for the lines that have no traceback."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        return record.getMessage()


class LoopFlushedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler whose flush, inside a running event loop, waits FLUSH_DELAY_S for more lines."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._flusher: asyncio.AbstractEventLoop | None = None   # the loop that has a flush scheduled
        # A UTF-8 text stream that passes every write straight to its byte buffer keeps nothing of its
        # own, so UTF-8 bytes written to that buffer stay in order with its text lines.
        buffer = getattr(stream, "buffer", None)
        utf8 = _is_utf8(getattr(stream, "encoding", None))
        self._bytes_out = buffer if utf8 and getattr(stream, "write_through", False) and buffer is not None else None

    def flush(self) -> None:
        """Flush now outside the loop (threads, shutdown); else once, FLUSH_DELAY_S from now."""
        flusher = self._flusher
        if flusher is not None and flusher.is_running():   # before get_running_loop: that costs a getpid
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            super().flush()                  # also after a loop stopped with a flush still scheduled
            return
        self._flusher = loop
        loop.call_at(loop.time() + FLUSH_DELAY_S, self._flush_now)

    def _flush_now(self) -> None:
        self._flusher = None
        super().flush()

    def write_line(self, line: bytes) -> None:
        """Write one UTF-8 line that ends in a newline and needs no formatting (an access line), as `emit`
        would, without a LogRecord; straight to the byte buffer when the stream has one."""
        with self.lock:  # type: ignore[union-attr]
            if self._bytes_out is not None:
                self._bytes_out.write(line)
            else:
                self.stream.write(line.decode())
        self.flush()


def _is_utf8(encoding: str | None) -> bool:
    try:
        return encoding is not None and codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        return False


def stderr_handler() -> LoopFlushedStreamHandler | None:
    """The root logger's stderr handler when `configure_logging` installed it."""
    handlers = logging.getLogger().handlers
    return next((h for h in handlers if isinstance(h, LoopFlushedStreamHandler)), None)


def _buffered_stderr() -> TextIO:
    """A buffered text stream on stderr's file descriptor (stderr itself when it has none, as under capture)."""
    try:
        descriptor = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):   # io.UnsupportedOperation is both
        return sys.stderr
    stream = open(descriptor, "w", buffering=BUFFER_BYTES, encoding=sys.stderr.encoding or "utf-8",
                  errors="backslashreplace", closefd=False)
    stream.reconfigure(write_through=True)   # the buffer below still batches; see write_line
    return stream


def configure_logging(level: str = "INFO") -> None:
    """Plain messages on stderr: access lines are JSON already, other lines are short sentences.

    Every record is scrubbed of credentials first (gateway.log_scrub), whichever logger made it.
    """
    scrub_logs()
    # Records need no thread or process names (the formatter prints only the message): skip looking them up.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = LoopFlushedStreamHandler(_buffered_stderr())
    handler.setFormatter(MessageFormatter())
    logging.basicConfig(level=level, handlers=[handler])
