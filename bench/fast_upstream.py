#!/usr/bin/env python3
"""The bench's mock upstream: an OpenAI-compatible chat endpoint on raw asyncio, as cheap as we can make it.

It shares the load generator's core with wrk, so every microsecond it spends is one the load side lacks;
hence no framework: an asyncio Protocol parsing HTTP/1.1 itself (keep-alive, pipelined requests) on uvloop
when installed, and answers rendered once per distinct request body.

  POST /v1/chat/completions  JSON answer with usage; with "stream": true an SSE answer (role chunk, content
                             chunks, finish chunk, a usage chunk when stream_options.include_usage, then
                             `data: [DONE]`), HTTP-chunked, one chunk per event, written in one go
  GET  /__stats              {"requests", "chat", "chat_stream", "errors"}: counters since start (the bench
                             reads their deltas to see that a proxy really forwarded each request)
  anything else              404, or 400 for a body that is not a chat request (OpenAI's error shape)

Usage is deterministic: prompt_tokens = 4 per message + (characters of its text + 3) // 4, plus 3;
completion_tokens = words of the answer, cut to max_completion_tokens / max_tokens when lower.
Request bodies need a Content-Length (411 otherwise): wrk, aiohttp and the gateway always send one.

    python bench/fast_upstream.py --port 18000
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
from typing import Any

ANSWER = ("A sidecar gateway sits on every request, so each millisecond it adds is paid by every user; "
          "it should forward the body as it came, keep connections warm and do its bookkeeping off the "
          "critical path, so that the provider's latency stays the only one that callers notice.")
STREAM_PIECES = 6                     # content chunks of a streamed answer
CACHE_MAX = 256                       # distinct request bodies whose answers are kept rendered
MAX_HEAD = 64 * 1024
MAX_BODY = 8 * 1024 * 1024
ID_SLOT = "@" * 12                    # where each answer's own 12-digit id goes
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 411: "Length Required", 413: "Payload Too Large"}


def dumps(value: Any) -> bytes:
    """Compact JSON bytes."""
    return json.dumps(value, separators=(",", ":")).encode()


def head(status: int, content_type: bytes, *, length: int | None, keep_alive: bool) -> bytes:
    """Status line and headers: Content-Length when given, else chunked."""
    framing = b"Content-Length: %d\r\n" % length if length is not None else b"Transfer-Encoding: chunked\r\n"
    return (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n%s%s\r\n"
            % (status, REASONS[status].encode(), content_type, framing,
               b"" if keep_alive else b"Connection: close\r\n"))


def error(status: int, message: str, *, keep_alive: bool = True) -> bytes:
    """A whole response with an OpenAI-shaped error body."""
    body = dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                            "code": None}})
    return head(status, b"application/json", length=len(body), keep_alive=keep_alive) + body


def prompt_tokens(messages: list[Any]) -> int:
    """A deterministic token count of the prompt, never above the gateway's bound (one token per byte)."""
    total = 3
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        total += 4 + (len(content) + 3) // 4 if isinstance(content, str) else 4
    return total


def usage_of(request: dict[str, Any]) -> dict[str, int]:
    """The usage block of the answer to `request`."""
    limit = request.get("max_completion_tokens") or request.get("max_tokens")
    completion = len(ANSWER.split())
    if isinstance(limit, int) and 0 < limit < completion:
        completion = limit
    prompt = prompt_tokens(request["messages"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def answer_words(usage: dict[str, int]) -> list[str]:
    """The words of the answer, as many as its completion tokens."""
    return ANSWER.split()[:usage["completion_tokens"]]


def render_json(request: dict[str, Any]) -> list[bytes]:
    """The body of a non-streamed answer, in pieces to be joined by its id."""
    usage = usage_of(request)
    body = dumps({"id": "chatcmpl-bench-" + ID_SLOT, "object": "chat.completion", "created": 1767225600,
                  "model": request.get("model", "gpt-4o-mini"),
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(answer_words(usage)),
                                                   "refusal": None, "annotations": []},
                               "logprobs": None, "finish_reason": "stop"}],
                  "usage": {**usage, "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}},
                  "service_tier": "default", "system_fingerprint": "fp_bench"})
    return body.split(ID_SLOT.encode())


def render_stream(request: dict[str, Any]) -> list[bytes]:
    """The HTTP-chunked SSE body of a streamed answer, in pieces to be joined by its id (every event has it)."""
    usage, model = usage_of(request), request.get("model", "gpt-4o-mini")
    options = request.get("stream_options")
    with_usage = isinstance(options, dict) and options.get("include_usage") is True
    words = answer_words(usage)
    step = -(-len(words) // STREAM_PIECES)
    pieces = [" ".join(words[i:i + step]) for i in range(0, len(words), step)]
    deltas = [{"role": "assistant", "content": ""}] + [{"content": (" " if i else "") + p} for i, p in enumerate(pieces)]
    events = [_event(model, [{"index": 0, "delta": d, "finish_reason": None}], with_usage) for d in deltas]
    events.append(_event(model, [{"index": 0, "delta": {}, "finish_reason": "stop"}], with_usage))
    if with_usage:
        events.append(_event(model, [], with_usage, usage))
    events.append(b"data: [DONE]\n\n")
    # the slot is as long as the id that replaces it, so the chunk sizes computed here stay right
    return (b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n").split(ID_SLOT.encode())


def _event(model: str, choices: list[Any], with_usage: bool, usage: dict[str, int] | None = None) -> bytes:
    chunk: dict[str, Any] = {"id": "chatcmpl-bench-" + ID_SLOT, "object": "chat.completion.chunk",
                             "created": 1767225600, "model": model, "choices": choices}
    if with_usage:
        chunk["usage"] = usage
    return b"data: " + dumps(chunk) + b"\n\n"


class Upstream:
    """Counters and rendered answers shared by every connection."""

    def __init__(self) -> None:
        self.stats = {"requests": 0, "chat": 0, "chat_stream": 0, "errors": 0}
        self.rendered: dict[bytes, tuple[bool, list[bytes], int]] = {}
        self.ids = itertools.count(1)

    def respond(self, method: str, path: str, body: bytes, keep_alive: bool) -> bytes:
        """The whole response to one request."""
        self.stats["requests"] += 1
        if method == "POST" and path.split("?", 1)[0] == "/v1/chat/completions":
            return self.chat(body, keep_alive)
        if method == "GET" and path == "/__stats":
            body = dumps(self.stats)
            return head(200, b"application/json", length=len(body), keep_alive=keep_alive) + body
        self.stats["errors"] += 1
        return error(404, f"no route {method} {path}", keep_alive=keep_alive)

    def chat(self, body: bytes, keep_alive: bool) -> bytes:
        answer = self.rendered.get(body) or self._render(body)
        if answer is None:
            self.stats["errors"] += 1
            return error(400, "the body is not a chat request with a 'messages' list", keep_alive=keep_alive)
        stream, pieces, length = answer
        self.stats["chat_stream" if stream else "chat"] += 1
        content_type = b"text/event-stream" if stream else b"application/json"
        return (head(200, content_type, length=None if stream else length, keep_alive=keep_alive)
                + (b"%012d" % next(self.ids)).join(pieces))

    def _render(self, body: bytes) -> tuple[bool, list[bytes], int] | None:
        try:
            request = json.loads(body)
            if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
                return None
            stream = request.get("stream") is True
            pieces = render_stream(request) if stream else render_json(request)
        except (ValueError, TypeError, AttributeError):
            return None
        if len(self.rendered) >= CACHE_MAX:
            self.rendered.clear()
        length = sum(map(len, pieces)) + len(ID_SLOT) * (len(pieces) - 1)
        self.rendered[body] = (stream, pieces, length)
        return self.rendered[body]


class Http11(asyncio.Protocol):
    """One client connection: parses requests out of the byte stream and answers each in order."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.transport is not None and self._answer_one():
            pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def _answer_one(self) -> bool:
        """Answer the first whole request in the buffer; False when there is none (yet)."""
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_HEAD:
                self._close_with(error(413, "request head too large", keep_alive=False))
            return False
        lines = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        method, path, version = (lines[0].split(" ") + ["", ""])[:3]
        headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in lines[1:])}
        length = headers.get("content-length", "0" if method in ("GET", "HEAD") else "")
        if not length.isdigit() or "transfer-encoding" in headers or int(length) > MAX_BODY:
            self._close_with(error(411, "a body needs a Content-Length (up to 8 MiB)", keep_alive=False))
            return False
        start, stop = end + 4, end + 4 + int(length)
        if len(self.buffer) < stop:
            return False
        body = bytes(self.buffer[start:stop])
        del self.buffer[:stop]
        connection = headers.get("connection", "").lower()
        keep_alive = connection == "keep-alive" if version == "HTTP/1.0" else connection != "close"
        assert self.transport is not None
        self.transport.write(self.upstream.respond(method, path, body, keep_alive))
        if not keep_alive:
            self.transport.close()
            self.transport = None
        return True

    def _close_with(self, response: bytes) -> None:
        self.upstream.stats["errors"] += 1
        assert self.transport is not None
        self.transport.write(response)
        self.transport.close()
        self.transport = None


async def serve(host: str, port: int) -> None:
    """Serve until cancelled."""
    upstream = Upstream()
    server = await asyncio.get_running_loop().create_server(lambda: Http11(upstream), host, port, backlog=1024)
    print(f"fast_upstream on http://{host}:{port} (loop: {type(asyncio.get_running_loop()).__module__})", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        uvloop = None
    runner = uvloop.run if uvloop is not None else asyncio.run
    try:
        runner(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
