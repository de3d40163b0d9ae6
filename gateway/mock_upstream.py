"""A scriptable OpenAI-compatible mock upstream for the quickstart, the test-suite and benchmarks.

Endpoints: POST /v1/chat/completions, POST /v1/completions, POST /v1/embeddings, GET /v1/models, OpenAI's
Responses and Anthropic's Messages (POST /v1/responses, POST /v1/messages: see gateway.mock_apis), and the
control endpoints GET /__stats, POST /__reset, POST /__script, POST /__always (for a mock in another process).

Usage is deterministic and derived from the request, so tests can compute the expected cost:
- prompt_tokens: whitespace-separated words in every message content (text parts of list contents count too)
  plus 3 per message for chat; words in `prompt` (completions) or `input` (embeddings); token-id lists
  count one token per id.
- completion_tokens: words in the answer. The answer is the configured `content`, cut to the first
  `max_completion_tokens` (else `max_tokens`) words when given, in which case finish_reason is "length".
  Streaming splits those words across at most `chunks` content chunks.
- cached tokens: a request with `"user": "cached"` reports prompt_tokens_details.cached_tokens =
  prompt_tokens // 2 (chat and completions).
- embeddings report prompt_tokens only (total_tokens equal) and one deterministic 8-dim vector per input.

`billed` sums only answers that reported usage and completed: non-streaming 200 answers, and streams that
asked for `stream_options.include_usage` and reached `[DONE]`. Error answers, hangs, resets and truncated
streams are never billed.

Scripted actions are taken per request in this order: the queue for the request's path, the path-less
queue, the sticky `always` action, else the normal answer.

Misbehaviours for hostile-upstream tests: a redirect is `Action(status=302, headers={"Location": ...})`;
`raw_body` answers bytes no serializer would write (a key echoed JSON-escaped or %-encoded, a hand-made
SSE stream); `pad_to` pads a chat or completions answer, or an error body, with spaces to any size, sent
in 64 KiB pieces and never held whole (with Content-Length, or chunked), and `dropped` counts the padded
answers the client broke off. `requests` keeps each body's raw bytes as well as its parsed JSON, so a
test sees exactly what an upstream received (a key sent twice, say).

Misbehaviours for the money path (chat and completions):
- `usage`: what the answer reports as usage, whole answers and stream usage chunks alike; a mapping
  replaces those fields of the real usage (None sends null), anything else replaces the whole block.
  `billed` still counts the real usage (what a provider bills). `omit_usage` sends no usage at all
  (and bills nothing).
- `endless`: a stream that never ends: content chunks, one word each, `event_interval_s` apart, until
  the client closes the connection (then `abandoned_streams` goes up and `stream_abandoned` is set).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import struct
import sys
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from aiohttp import web

from gateway.clock import Clock, SystemClock

__all__ = [
    "Action", "RecordedRequest", "ModelUsage", "BilledUsage", "MockUpstream", "MOCK_UPSTREAM", "run_mock",
]

JSON = dict[str, Any]
_POLL_S = 0.05
_PAD_PIECE = b" " * 65536
_EMBEDDING_DIM = 8
_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-3.5-turbo-instruct", "text-embedding-3-small")
_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "permission_denied"),
    404: ("not_found_error", "model_not_found"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    500: ("server_error", "internal_error"),
    502: ("server_error", "bad_gateway"),
    503: ("server_error", "overloaded"),
    504: ("server_error", "timeout"),
}

try:
    import orjson

    def _dumps(obj: Any) -> bytes:
        """Serialize to compact JSON bytes."""
        return orjson.dumps(obj)

    _loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # pragma: no cover - orjson is an optional speed-up

    def _dumps(obj: Any) -> bytes:
        """Serialize to compact JSON bytes."""
        return json.dumps(obj, separators=(",", ":")).encode()

    _loads = json.loads


@dataclass
class Action:
    """One scripted answer; the defaults give the normal 200 answer."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: JSON | None = None
    hang: bool = False
    reset: bool = False
    truncate_after: int | None = None
    delay_s: float = 0.0
    echo_request: bool = False
    raw_body: str | None = None      # sent as is (Content-Type application/json unless `headers` names one)
    pad_to: int | None = None        # pad the answer with spaces to this many bytes (see the module docstring)
    chunked: bool = False            # send a padded answer chunked, without Content-Length
    usage: Any = None
    omit_usage: bool = False
    endless: bool = False
    event_interval_s: float = 0.0

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Action:
        """Build an action from its JSON form, rejecting unknown keys."""
        if not isinstance(data, Mapping):
            raise ValueError(f"an action must be a JSON object, got {type(data).__name__}")
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown action keys: {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class RecordedRequest:
    """A request as the mock received it; header names are lower-cased."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any
    time: float
    raw: bytes = b""                 # the body exactly as received


@dataclass
class ModelUsage:
    """Billed token totals for one model."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    requests: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0


@dataclass
class BilledUsage:
    """Usage the mock reported in completed answers, per model."""

    models: dict[str, ModelUsage] = field(default_factory=dict)

    def add(self, model: str, usage: JSON) -> None:
        """Bill one answer's usage to a model."""
        totals = self.models.setdefault(model, ModelUsage())
        totals.prompt_tokens += usage["prompt_tokens"]
        totals.completion_tokens += usage.get("completion_tokens", 0)
        totals.cached_tokens += usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        totals.cache_write_tokens += usage.get("cache_write_tokens", 0)
        totals.cache_write_1h_tokens += usage.get("cache_write_1h_tokens", 0)
        totals.requests += 1

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens over all models."""
        return sum(m.prompt_tokens for m in self.models.values())

    @property
    def completion_tokens(self) -> int:
        """Completion tokens over all models."""
        return sum(m.completion_tokens for m in self.models.values())

    @property
    def cached_tokens(self) -> int:
        """Cached prompt tokens over all models."""
        return sum(m.cached_tokens for m in self.models.values())

    @property
    def requests(self) -> int:
        """Billed answers over all models."""
        return sum(m.requests for m in self.models.values())

    def to_json(self) -> JSON:
        """Totals and per-model usage as JSON."""
        return {
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens, "requests": self.requests,
            "models": {name: asdict(usage) for name, usage in self.models.items()},
        }


@dataclass(frozen=True)
class _Completion:
    """The answer text for one completion-token count, pre-split into stream pieces."""

    text: str
    pieces: tuple[str, ...]
    tokens: int
    finish_reason: str


_CLOSING = web.AppKey("mock_closing", asyncio.Event)
_Answer = Callable[[web.Request, JSON, "Action | None"], Awaitable[web.StreamResponse]]


def _words(value: Any) -> int:
    """Whitespace-separated words in a string, list, or text part; an int is one token id."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, int):
        return 1
    if isinstance(value, list):
        return sum(_words(item) for item in value)
    if isinstance(value, dict):
        return _words(value.get("text"))
    return 0


def _prompt_tokens(body: JSON) -> int:
    """Prompt tokens of a chat, completions or embeddings request (see the module docstring)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return sum(_words(m.get("content")) + 3 for m in messages if isinstance(m, dict))
    return _words(body.get("prompt", body.get("input")))


def _max_tokens(body: JSON) -> int | None:
    """The request's completion-token limit, if it gave a usable one."""
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    return limit if isinstance(limit, int) and limit >= 0 else None


def _split(words: list[str], chunks: int) -> tuple[str, ...]:
    """Split words into at most `chunks` pieces whose concatenation is the joined text."""
    count = min(chunks, len(words))
    if count == 0:
        return ("",)
    size, extra = divmod(len(words), count)
    pieces, start = [], 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        pieces.append((" " if i else "") + " ".join(words[start:end]))
        start = end
    return tuple(pieces)


def _vector(item: Any) -> list[float]:
    """A deterministic 8-dim embedding for one input."""
    seed = zlib.crc32(repr(item).encode())
    return [((seed >> (4 * i)) & 0xF) / 15.0 - 0.5 for i in range(_EMBEDDING_DIM)]


def _embedding_items(inputs: Any) -> list[Any]:
    """The separate inputs of an embeddings request (a token-id list is one input)."""
    if isinstance(inputs, list) and inputs and not all(isinstance(i, int) for i in inputs):
        return inputs
    return [inputs]


def _event(obj: Any) -> bytes:
    """One server-sent event carrying JSON."""
    return b"data: " + _dumps(obj) + b"\n\n"


def _disconnected(request: web.Request) -> bool:
    """Whether the client's connection is gone."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _abort(request: web.Request, resp: web.StreamResponse | None = None) -> web.StreamResponse:
    """Drop the TCP connection abruptly; aiohttp then fails quietly to finish `resp`."""
    if request.transport is not None:
        request.transport.abort()
    return resp if resp is not None else web.Response()


def _error_json(status: int, message: str | None = None) -> JSON:
    """An OpenAI-shaped error body for a status."""
    fallback = ("server_error" if status >= 500 else "invalid_request_error", str(status))
    type_, code = _ERRORS.get(status, fallback)
    error = {"message": message or f"mock upstream error {status}", "type": type_, "param": None, "code": code}
    return {"error": error}


class _ChatFormat:
    """chat.completion and chat.completion.chunk objects."""

    prefix = "chatcmpl"

    @staticmethod
    def full(base: JSON, done: _Completion, usage: JSON) -> JSON:
        """The non-streaming answer."""
        message = {"role": "assistant", "content": done.text, "refusal": None}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": done.finish_reason}
        return {**base, "object": "chat.completion", "choices": [choice], "usage": usage}

    @staticmethod
    def piece(base: JSON, text: str, first: bool) -> JSON:
        """A content chunk; the first also carries the role."""
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        return {**base, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}

    @staticmethod
    def final(base: JSON, finish_reason: str) -> JSON:
        """The chunk that carries finish_reason."""
        return {**base, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason}]}

    @staticmethod
    def usage(base: JSON, usage: JSON) -> JSON:
        """The trailing usage chunk."""
        return {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}


class _TextFormat:
    """Legacy text_completion objects, streaming and not."""

    prefix = "cmpl"

    @staticmethod
    def full(base: JSON, done: _Completion, usage: JSON) -> JSON:
        """The non-streaming answer."""
        choice = {"text": done.text, "index": 0, "logprobs": None, "finish_reason": done.finish_reason}
        return {**base, "object": "text_completion", "choices": [choice], "usage": usage}

    @staticmethod
    def piece(base: JSON, text: str, first: bool) -> JSON:
        """A content chunk."""
        return {**base, "object": "text_completion",
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": None}]}

    @staticmethod
    def final(base: JSON, finish_reason: str) -> JSON:
        """The chunk that carries finish_reason."""
        return {**base, "object": "text_completion",
                "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": finish_reason}]}

    @staticmethod
    def usage(base: JSON, usage: JSON) -> JSON:
        """The trailing usage chunk."""
        return {**base, "object": "text_completion", "choices": [], "usage": usage}


_Format = type[_ChatFormat] | type[_TextFormat]
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


@dataclass(frozen=True)
class _Reply:
    """One completion answer, ready to send whole or as a stream."""

    fmt: _Format
    base: JSON
    done: _Completion
    usage: JSON
    model: str
    include_usage: bool
    headers: Mapping[str, str]
    truncate_after: int | None
    action: Action | None

    @property
    def reported_usage(self) -> Any:
        """The usage the answer reports: the real one unless the action garbles it."""
        action = self.action
        if action is None or action.usage is None:
            return self.usage
        return {**self.usage, **action.usage} if isinstance(action.usage, dict) else action.usage

    @property
    def omits_usage(self) -> bool:
        return self.action is not None and self.action.omit_usage


class MockUpstream:
    """An in-memory OpenAI-compatible upstream whose answers tests can script and inspect."""

    def __init__(
        self, *, name: str = "mock", content: str = "Hello from the mock upstream!", chunks: int = 5,
        clock: Clock | None = None,
    ) -> None:
        self.name = name
        self.content = content
        self.chunks = max(1, chunks)
        self._clock = clock or SystemClock()
        self._words = content.split()
        self._completions: dict[int, _Completion] = {}
        self._headers = {"x-mock-upstream": name}
        self.reset()

    def reset(self) -> None:
        """Forget requests, billing, scripts, the sticky action and the stream gate."""
        self.requests: list[RecordedRequest] = []
        self.hits = 0
        self.dropped = 0
        self.abandoned_streams = 0
        self.stream_abandoned = asyncio.Event()
        self.billed = BilledUsage()
        self.stream_gate: asyncio.Event | None = None
        self._queue: deque[Action] = deque()
        self._path_queues: dict[str, deque[Action]] = {}
        self._always: Action | None = None

    def script(self, *actions: Action, path: str | None = None) -> None:
        """Queue actions, one consumed per request (only requests to `path` when given)."""
        queue = self._queue if path is None else self._path_queues.setdefault(path, deque())
        queue.extend(actions)

    def always(self, action: Action | None) -> None:
        """Answer every request with this action once the queues are empty; None clears it."""
        self._always = action

    @property
    def pending(self) -> int:
        """Scripted actions not consumed yet."""
        return len(self._queue) + sum(len(q) for q in self._path_queues.values())

    def usage_for(self, body: JSON) -> JSON:
        """The usage the mock reports for a request body (chat, completions or embeddings)."""
        prompt = _prompt_tokens(body)
        if "input" in body and "messages" not in body:
            return {"prompt_tokens": prompt, "total_tokens": prompt}
        completion = self.completion(_max_tokens(body)).tokens
        cached = prompt // 2 if body.get("user") == "cached" else 0
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def app(self) -> web.Application:
        """A fresh aiohttp application serving this mock's state."""
        app = web.Application()
        app[MOCK_UPSTREAM] = self
        app[_CLOSING] = asyncio.Event()
        app.on_shutdown.append(self._on_shutdown)
        answers = _Answers(self, _Writer(self))
        app.router.add_post("/v1/chat/completions", answers.chat)
        app.router.add_post("/v1/completions", answers.completions_handler)
        app.router.add_post("/v1/embeddings", answers.embeddings)
        app.router.add_get("/v1/models", answers.models)
        from gateway.mock_apis import add_api_routes   # (it builds on this module)
        add_api_routes(app, self, answers)
        app.router.add_get("/__stats", self._stats)
        app.router.add_post("/__reset", self._reset)
        app.router.add_post("/__script", self._script)
        app.router.add_post("/__always", self._set_always)
        return app

    async def record_request(self, request: web.Request) -> Any:
        """Append the request to `requests` and return its JSON body (None if absent or invalid)."""
        raw = await request.read() if request.can_read_body else b""
        try:
            body = _loads(raw) if raw else None
        except ValueError:
            body = None
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append(RecordedRequest(request.method, request.path, headers, body, self._clock.now(), raw))
        self.hits += 1
        return body

    def next_action(self, path: str) -> Action | None:
        """The scripted action for this request, if any."""
        queue = self._path_queues.get(path)
        if queue:
            return queue.popleft()
        if self._queue:
            return self._queue.popleft()
        return self._always

    # -- what the answers take from the mock -------------------------------------------------------------

    def completion(self, limit: int | None) -> _Completion:
        """The answer for a completion-token limit, cached per word count."""
        count = len(self._words) if limit is None else min(limit, len(self._words))
        done = self._completions.get(count)
        if done is None:
            words = self._words[:count]
            finish = "length" if count < len(self._words) else "stop"
            done = _Completion(" ".join(words), _split(words, self.chunks), count, finish)
            self._completions[count] = done
        return done

    def json_response(self, status: int, obj: Any, headers: Mapping[str, str] | None = None) -> web.Response:
        """A JSON response carrying the mock's name header and any extra headers."""
        merged = {**self._headers, **headers} if headers else self._headers
        return web.Response(status=status, body=_dumps(obj), content_type="application/json", headers=merged)

    async def _on_shutdown(self, app: web.Application) -> None:
        """Release hung and gated handlers so the server stops promptly."""
        app[_CLOSING].set()

    # -- control endpoints -------------------------------------------------------------------------------

    async def _stats(self, request: web.Request) -> web.Response:
        """Hits, billed usage and pending scripted actions."""
        stats = {"name": self.name, "hits": self.hits, "billed": self.billed.to_json(), "pending": self.pending,
                 "dropped": self.dropped}
        return self.json_response(200, stats)

    async def _reset(self, request: web.Request) -> web.Response:
        """Reset over HTTP."""
        self.reset()
        return self.json_response(200, {"ok": True})

    async def _script(self, request: web.Request) -> web.Response:
        """Queue actions from a JSON list, or from {"actions": [...], "path": "/v1/..."}."""
        try:
            data = await request.json()
            spec: dict[str, Any] = {"actions": data} if isinstance(data, list) else data
            actions = [Action.from_json(a) for a in spec["actions"]]
            path = spec.get("path")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return self.json_response(400, _error_json(400, f"bad script: {exc}"))
        self.script(*actions, path=path)
        return self.json_response(200, {"ok": True, "pending": self.pending})

    async def _set_always(self, request: web.Request) -> web.Response:
        """Set the sticky action from a JSON object, or clear it with null."""
        try:
            data = await request.json()
            action = None if data is None else Action.from_json(data)
        except (ValueError, TypeError) as exc:
            return self.json_response(400, _error_json(400, f"bad action: {exc}"))
        self.always(action)
        return self.json_response(200, {"ok": True})


class _Answers:
    """Answers the /v1 endpoints of a mock: as a normal upstream would, or as the next scripted action says."""

    def __init__(self, mock: MockUpstream, writer: _Writer) -> None:
        self.mock = mock
        self.writer = writer

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, self.answer_chat)

    async def completions_handler(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, self.answer_text)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, self.answer_embeddings)

    async def models(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, self.answer_models)

    async def serve(self, request: web.Request, answer: _Answer) -> web.StreamResponse:
        """Record the request, then answer it normally or as scripted."""
        body = await self.mock.record_request(request)
        action = self.mock.next_action(request.path)
        if action is None:
            return await answer(request, body, None)
        return await self.act(request, body, action, answer)

    async def act(self, request: web.Request, body: Any, action: Action, answer: _Answer) -> web.StreamResponse:
        """Carry out one scripted action."""
        if action.delay_s > 0 and not await self.writer.delay(request, action.delay_s):
            return _abort(request)
        if action.reset:
            return _abort(request)
        if action.hang:
            await self.writer.wait(request, None)
            return _abort(request)
        if action.echo_request:
            return self.mock.json_response(action.status, self.echo(request, body), action.headers)
        if action.raw_body is not None:
            headers = {"Content-Type": "application/json", **self.mock._headers, **action.headers}
            return web.Response(status=action.status, body=action.raw_body.encode(), headers=headers)
        if action.status != 200:
            error = action.body or _error_json(action.status)
            if action.pad_to is not None:
                return (await self.writer.padded(request, action.status, _dumps(error), action))[0]
            return self.mock.json_response(action.status, error, action.headers)
        return await answer(request, body, action)

    async def answer_chat(self, request: web.Request, body: Any, action: Action | None) -> web.StreamResponse:
        """Answer a chat completion request."""
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body.get("messages"):
            return self.mock.json_response(400, _error_json(400, "model and messages are required"))
        return await self.answer_completion(request, body, action, _ChatFormat)

    async def answer_text(self, request: web.Request, body: Any, action: Action | None) -> web.StreamResponse:
        """Answer a legacy completions request."""
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or "prompt" not in body:
            return self.mock.json_response(400, _error_json(400, "model and prompt are required"))
        return await self.answer_completion(request, body, action, _TextFormat)

    async def answer_completion(
        self, request: web.Request, body: JSON, action: Action | None, fmt: _Format,
    ) -> web.StreamResponse:
        """Answer a chat or text completion, streaming when asked."""
        reply = self.reply(body, action, fmt)
        if body.get("stream"):
            return await self.writer.stream(request, reply)
        answer = fmt.full(reply.base, reply.done, reply.reported_usage)
        if reply.omits_usage:
            del answer["usage"]
        payload = _dumps(answer)
        if reply.truncate_after is not None:
            return await self.writer.truncated_body(request, payload, reply.truncate_after, reply.headers)
        if action is not None and action.pad_to is not None:
            response, complete = await self.writer.padded(request, 200, payload, action)
            if complete and not reply.omits_usage:
                self.mock.billed.add(reply.model, reply.usage)
            return response
        if not reply.omits_usage:
            self.mock.billed.add(reply.model, reply.usage)
        return web.Response(body=payload, content_type="application/json", headers=reply.headers)

    def reply(self, body: JSON, action: Action | None, fmt: _Format) -> _Reply:
        """Everything needed to answer one completion request."""
        include_usage = bool(body.get("stream") and (body.get("stream_options") or {}).get("include_usage"))
        base = {"id": f"{fmt.prefix}-{self.mock.name}-{self.mock.hits}", "created": int(self.mock._clock.now()),
                "model": body["model"]}
        if include_usage and fmt is _ChatFormat:
            base["usage"] = None  # OpenAI sends "usage": null on every chunk before the usage chunk
        return _Reply(
            fmt=fmt, base=base, done=self.mock.completion(_max_tokens(body)), usage=self.mock.usage_for(body),
            model=body["model"], include_usage=include_usage,
            headers={**self.mock._headers, **action.headers} if action else self.mock._headers,
            truncate_after=action.truncate_after if action else None, action=action,
        )

    async def answer_embeddings(
        self, request: web.Request, body: Any, action: Action | None,
    ) -> web.StreamResponse:
        """Answer an embeddings request with one deterministic vector per input."""
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or "input" not in body:
            return self.mock.json_response(400, _error_json(400, "model and input are required"))
        items = _embedding_items(body["input"])
        as_base64 = body.get("encoding_format") == "base64"
        data = [{"object": "embedding", "index": i, "embedding": self.encode(_vector(item), as_base64)}
                for i, item in enumerate(items)]
        usage = self.mock.usage_for(body)
        self.mock.billed.add(body["model"], usage)
        headers = {**self.mock._headers, **action.headers} if action else self.mock._headers
        return self.mock.json_response(200, {"object": "list", "data": data, "model": body["model"], "usage": usage}, headers)

    @staticmethod
    def encode(vector: list[float], as_base64: bool) -> list[float] | str:
        """A vector as floats, or as base64 little-endian float32 like OpenAI's encoding_format=base64."""
        if not as_base64:
            return vector
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

    async def answer_models(self, request: web.Request, body: Any, action: Action | None) -> web.StreamResponse:
        """List the models the mock pretends to serve."""
        created = int(self.mock._clock.now())
        data = [{"id": m, "object": "model", "created": created, "owned_by": self.mock.name} for m in _MODELS]
        return self.mock.json_response(200, {"object": "list", "data": data}, self.mock._headers)

    @staticmethod
    def echo(request: web.Request, body: Any) -> JSON:
        """An error body that echoes back what the client sent."""
        headers = {str(k): v for k, v in request.headers.items()}
        echo = {"method": request.method, "path": request.path, "headers": headers, "body": body}
        return {"error": {"message": "mock upstream echo", "type": "mock_echo", "param": None, "code": "echo",
                          "request": echo}}


class _Writer:
    """Writes a mock's answers on the wire: SSE streams (gated, endless), truncated and padded bodies."""

    def __init__(self, mock: MockUpstream) -> None:
        self.mock = mock

    async def stream(self, request: web.Request, reply: _Reply) -> web.StreamResponse:
        """Stream the answer as server-sent events, each written on its own."""
        resp = web.StreamResponse(headers={**reply.headers, **_SSE_HEADERS})
        try:
            await resp.prepare(request)
            for i, text in enumerate(reply.done.pieces):
                if reply.truncate_after is not None and i >= reply.truncate_after:
                    return _abort(request, resp)
                await self.send(request, resp, reply.fmt.piece(reply.base, text, i == 0))
                if i == 0 and self.mock.stream_gate is not None and not await self.wait(request, self.mock.stream_gate):
                    return _abort(request, resp)
            if reply.action is not None and reply.action.endless:
                return await self.endless(request, resp, reply)
            await self.finish_stream(request, resp, reply)
        except ConnectionError:
            return resp
        if reply.include_usage and not reply.omits_usage:
            self.mock.billed.add(reply.model, reply.usage)
        return resp

    async def finish_stream(self, request: web.Request, resp: web.StreamResponse, reply: _Reply) -> None:
        """Send the finish_reason chunk, the usage chunk when asked for, and [DONE]."""
        await self.send(request, resp, reply.fmt.final(reply.base, reply.done.finish_reason))
        if reply.include_usage and not reply.omits_usage:
            await self.send(request, resp, reply.fmt.usage(reply.base, reply.reported_usage))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()

    async def endless(self, request: web.Request, resp: web.StreamResponse, reply: _Reply) -> web.StreamResponse:
        """Send one word per chunk until the client closes the connection (or the mock shuts down)."""
        assert reply.action is not None
        interval, words = reply.action.event_interval_s, self.mock._words or ["word"]
        sent = 0
        try:
            with contextlib.suppress(ConnectionError):
                while not _disconnected(request):
                    await self.send(request, resp, reply.fmt.piece(reply.base, " " + words[sent % len(words)], False))
                    sent += 1
                    if interval > 0 and not await self.delay(request, interval):
                        return _abort(request, resp)
                    await asyncio.sleep(0)   # let the connection's closing be seen
        finally:                             # (aiohttp may cancel a handler whose client is gone)
            if _disconnected(request):
                self.mock.abandoned_streams += 1
                self.mock.stream_abandoned.set()
        return resp

    @staticmethod
    async def send(request: web.Request, resp: web.StreamResponse, obj: JSON) -> None:
        """Write one event and wait until the transport has taken it."""
        await resp.write(_event(obj))
        await request.writer.drain()

    async def truncated_body(
        self, request: web.Request, payload: bytes, keep: int, headers: Mapping[str, str],
    ) -> web.StreamResponse:
        """Declare the full body, send only its first `keep` bytes, then drop the connection."""
        resp = web.StreamResponse(headers={**headers, "Content-Type": "application/json"})
        resp.content_length = len(payload)
        with contextlib.suppress(ConnectionError):
            await resp.prepare(request)
            await resp.write(payload[:keep])
            await request.writer.drain()
        return _abort(request, resp)

    async def padded(
        self, request: web.Request, status: int, payload: bytes, action: Action,
    ) -> tuple[web.StreamResponse, bool]:
        """Send a JSON `payload` with spaces before its closing brace, up to `action.pad_to` bytes in all,
        one piece at a time; whether all of it was sent (a client that left is counted in `dropped`)."""
        padding = max(0, (action.pad_to or 0) - len(payload))
        resp = web.StreamResponse(status=status, headers={
            **self.mock._headers, **action.headers, "Content-Type": "application/json"})
        if not action.chunked:
            resp.content_length = len(payload) + padding
        try:
            await resp.prepare(request)
            await resp.write(payload[:-1])
            while padding > 0:
                piece = _PAD_PIECE if padding >= len(_PAD_PIECE) else _PAD_PIECE[:padding]
                await resp.write(piece)
                await request.writer.drain()
                padding -= len(piece)
            await resp.write(payload[-1:])
            await resp.write_eof()
        except ConnectionError:
            self.mock.dropped += 1
            return resp, False
        except asyncio.CancelledError:       # aiohttp's TestServer cancels the handler of a client that left
            self.mock.dropped += 1
            raise
        return resp, True

    @staticmethod
    async def wait(request: web.Request, event: asyncio.Event | None) -> bool:
        """Wait for `event` (None: forever) while the client is connected and the app runs; True if it fired."""
        closing = request.app[_CLOSING]
        while True:
            if event is not None and event.is_set():
                return True
            if closing.is_set() or _disconnected(request):
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_POLL_S):
                    await (closing if event is None else event).wait()

    @staticmethod
    async def delay(request: web.Request, seconds: float) -> bool:
        """Sleep, cut short by app shutdown; False when shutting down."""
        closing = request.app[_CLOSING]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await closing.wait()
        return not closing.is_set()


MOCK_UPSTREAM = web.AppKey("mock_upstream", MockUpstream)


def _event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is installed, else the default loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_mock(host: str, port: int) -> None:
    """Serve a MockUpstream on host:port until interrupted."""
    line = f"mock upstream listening on http://{host}:{port}/v1"
    web.run_app(
        MockUpstream().app(), host=host, port=port, access_log=None, loop=_event_loop(),
        print=lambda _banner: print(line, file=sys.stdout, flush=True),
    )
