"""Buffered log lines reach the stream, also when the loop stops before their scheduled flush."""

from __future__ import annotations

import asyncio
import io
import logging

from gateway.log_output import LoopFlushedStreamHandler


def buffered() -> tuple[io.BytesIO, io.TextIOWrapper]:
    sink = io.BytesIO()
    return sink, io.TextIOWrapper(io.BufferedWriter(sink, 1 << 16), encoding="utf-8")


def test_a_line_written_just_before_the_loop_stops_is_flushed_at_shutdown() -> None:
    sink, stream = buffered()
    handler = LoopFlushedStreamHandler(stream)

    async def last_request() -> None:
        handler.write_line(b'{"request_id": "last"}\n')   # its flush is scheduled, then the loop ends

    asyncio.run(last_request())
    assert sink.getvalue() == b""
    handler.flush()                                      # what logging.shutdown does
    assert sink.getvalue() == b'{"request_id": "last"}\n'


def test_access_lines_as_bytes_keep_their_place_among_text_log_lines() -> None:
    sink = io.BytesIO()
    stream = io.TextIOWrapper(io.BufferedWriter(sink, 1 << 16), encoding="utf-8", write_through=True)
    handler = LoopFlushedStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("test.log_output.order")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("before é")
        handler.write_line('{"request_id": "ü"}\n'.encode())
        logger.warning("after")
    finally:
        logger.removeHandler(handler)
    handler.flush()
    assert sink.getvalue().decode().splitlines() == ["before é", '{"request_id": "ü"}', "after"]


def test_access_lines_on_a_stream_that_is_not_utf8_are_written_in_its_encoding() -> None:
    sink = io.BytesIO()
    stream = io.TextIOWrapper(io.BufferedWriter(sink, 1 << 16), encoding="latin-1", write_through=True)
    handler = LoopFlushedStreamHandler(stream)
    handler.write_line('{"caller": "é"}\n'.encode())
    handler.flush()
    assert sink.getvalue() == '{"caller": "é"}\n'.encode("latin-1")
