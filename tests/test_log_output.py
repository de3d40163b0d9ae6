"""Buffered log lines reach the stream, also when the loop stops before their scheduled flush."""

from __future__ import annotations

import asyncio
import io

from gateway.log_output import LoopFlushedStreamHandler


def buffered() -> tuple[io.BytesIO, io.TextIOWrapper]:
    sink = io.BytesIO()
    return sink, io.TextIOWrapper(io.BufferedWriter(sink, 1 << 16), encoding="utf-8")


def test_a_line_written_just_before_the_loop_stops_is_flushed_at_shutdown() -> None:
    sink, stream = buffered()
    handler = LoopFlushedStreamHandler(stream)

    async def last_request() -> None:
        handler.write_line('{"request_id": "last"}')   # its flush is scheduled, then the loop ends

    asyncio.run(last_request())
    assert sink.getvalue() == b""
    handler.flush()                                      # what logging.shutdown does
    assert sink.getvalue() == b'{"request_id": "last"}\n'
