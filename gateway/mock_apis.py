"""The mock upstream's Responses (`POST /v1/responses`) and Messages (`POST /v1/messages`) endpoints.

Usage is deterministic, as on the chat endpoints (gateway.mock_upstream):
- input tokens: words in every text (a string, or the `text` of each part) of `input` / `messages`, 3 per item,
  plus the words of `instructions` / `system`.
- output tokens: words in the answer, cut to `max_output_tokens` / `max_tokens` (then the answer is
  `incomplete` / `max_tokens`); a stream splits them across at most `chunks` deltas.
- Responses cache reads: `"user": "cached"` reports input_tokens_details.cached_tokens = input // 2.
- Messages prompt caching: the text up to and including the last block with `cache_control` (in `system`, then
  `messages`) is the cached prefix. The first request with a prefix writes it (cache_creation_input_tokens =
  its words), a later one with the same prefix reads it (cache_read_input_tokens); `input_tokens` is the rest.
  Calls must carry `x-api-key` (any value) and `anthropic-version`, else 401 / 400 in Anthropic's shape.

Scripted actions work as on the chat endpoints (status, delay, hang, reset, echo_request, raw_body,
truncate_after, omit_usage, endless, headers); an error status answers in the endpoint's own error shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.mock_upstream import (
    _SSE_HEADERS, Action, MockUpstream, _abort, _Answers, _disconnected, _dumps, _error_json,
)

__all__ = ["add_api_routes", "anthropic_error_json"]

JSON = dict[str, Any]
_Body = Callable[[web.Request, Any, "Action | None"], Awaitable[web.StreamResponse]]
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 429: "rate_limit_error", 529: "overloaded_error"}


def anthropic_error_json(status: int, message: str | None = None) -> JSON:
    """An Anthropic-shaped error body for a status."""
    type_ = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": type_, "message": message or f"mock upstream error {status}"}}


def _words(value: Any) -> int:
    """Words in a string, or in the texts of a list of parts or items."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(item) for item in value)
    if isinstance(value, dict):
        return _words(value.get("text", value.get("content")))
    return 0


def _items(value: Any) -> int:
    return len(value) if isinstance(value, list) else 1


def _sse(name: str, data: JSON) -> bytes:
    """One named server-sent event."""
    return b"event: " + name.encode() + b"\ndata: " + _dumps(data) + b"\n\n"


def _blocks(body: JSON) -> list[Any]:
    """The system's and the messages' content blocks in order (a text given as a string: one block)."""
    blocks: list[Any] = []
    system = body.get("system")
    blocks += system if isinstance(system, list) else [{"text": system}] if system else []
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        blocks += content if isinstance(content, list) else [{"text": content}]
    return blocks


def _cache_prefix(body: JSON) -> str | None:
    """The text of every block up to the last one marked `cache_control`, or None when none is."""
    blocks = _blocks(body)
    marked = [i for i, block in enumerate(blocks) if isinstance(block, dict) and block.get("cache_control")]
    if not marked:
        return None
    return "\x00".join(str(block.get("text", "")) if isinstance(block, dict) else "" for block in blocks[:marked[-1] + 1])


def _writes_for_an_hour(body: JSON) -> bool:
    """Whether the last block marked `cache_control` asks a time to live of an hour (`ttl: "1h"`)."""
    marks = [block["cache_control"] for block in _blocks(body) if isinstance(block, dict) and block.get("cache_control")]
    return bool(marks) and isinstance(marks[-1], dict) and marks[-1].get("ttl") == "1h"


class ApiAnswers:
    """Answers /v1/responses and /v1/messages for a MockUpstream."""

    def __init__(self, mock: MockUpstream, answers: _Answers) -> None:
        self.mock, self.answers = mock, answers
        self.cached_prefixes: set[str] = set()

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, self.answer_responses, anthropic=False)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self.serve(request, self.answer_messages, anthropic=True)

    async def serve(self, request: web.Request, answer: _Body, *, anthropic: bool) -> web.StreamResponse:
        """Record the request, then answer it normally or as scripted (errors in the endpoint's shape)."""
        body = await self.mock.record_request(request)
        action = self.mock.next_action(request.path)
        if action is None:
            return await answer(request, body, None)
        if anthropic and action.status != 200 and action.body is None:
            action = dataclasses.replace(action, body=anthropic_error_json(action.status))
        return await self.answers.act(request, body, action, answer)

    # -- Responses ---------------------------------------------------------------------------------------

    def responses_usage(self, body: JSON) -> JSON:
        """The usage the mock reports for a Responses request."""
        prompt = _words(body.get("input")) + 3 * _items(body.get("input")) + _words(body.get("instructions"))
        output = self.mock.completion(_limit(body, "max_output_tokens")).tokens
        cached = prompt // 2 if body.get("user") == "cached" else 0
        return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached}, "output_tokens": output,
                "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + output}

    async def answer_responses(self, request: web.Request, body: Any, action: Action | None) -> web.StreamResponse:
        """Answer a Responses request, streaming when asked."""
        if not isinstance(body, dict) or not isinstance(body.get("model"), str) or "input" not in body:
            return self.mock.json_response(400, _openai_error(400, "model and input are required"))
        usage, done = self.responses_usage(body), self.mock.completion(_limit(body, "max_output_tokens"))
        status = "completed" if done.finish_reason == "stop" else "incomplete"
        rid = f"resp_{self.mock.name}_{self.mock.hits}"
        message = {"type": "message", "id": f"msg_{rid}", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": done.text, "annotations": []}]}
        response = {"id": rid, "object": "response", "created_at": int(self.mock._clock.now()), "status": status,
                    "model": body["model"], "output": [message], "usage": usage, "error": None,
                    "incomplete_details": None if status == "completed" else {"reason": "max_output_tokens"}}
        billed = {"prompt_tokens": usage["input_tokens"], "completion_tokens": usage["output_tokens"],
                  "prompt_tokens_details": usage["input_tokens_details"]}
        if body.get("stream"):
            return await self.stream(request, action, body["model"], billed,
                                     self.responses_events(response, message, done.pieces))
        return self.whole(body["model"], response, billed, action)

    @staticmethod
    def responses_events(response: JSON, message: JSON, pieces: tuple[str, ...]) -> tuple[list[bytes], list[bytes],
                                                                                          list[bytes]]:
        """The stream's opening events, its deltas and its closing events."""
        start = {**response, "status": "in_progress", "usage": None, "output": []}
        part = {"type": "output_text", "text": "", "annotations": []}
        item_id = message["id"]
        head = [_sse("response.created", {"type": "response.created", "response": start}),
                _sse("response.output_item.added", {"type": "response.output_item.added", "output_index": 0,
                                                    "item": {**message, "content": [], "status": "in_progress"}}),
                _sse("response.content_part.added", {"type": "response.content_part.added", "item_id": item_id,
                                                     "output_index": 0, "content_index": 0, "part": part})]
        deltas = [_sse("response.output_text.delta", {"type": "response.output_text.delta", "item_id": item_id,
                                                      "output_index": 0, "content_index": 0, "delta": piece})
                  for piece in pieces]
        final = "response.completed" if response["status"] == "completed" else "response.incomplete"
        tail = [_sse("response.output_item.done", {"type": "response.output_item.done", "output_index": 0,
                                                   "item": message}),
                _sse(final, {"type": final, "response": response})]
        return head, deltas, tail

    # -- Messages ----------------------------------------------------------------------------------------

    def messages_usage(self, body: JSON) -> JSON:
        """The usage the mock reports for a Messages request (and the cached prefix it writes or reads)."""
        messages = body.get("messages")
        prompt = _words(body.get("system")) + _words(messages) + 3 * _items(messages)
        prefix, read, written = _cache_prefix(body), 0, 0
        if prefix is not None:
            cached = len(prefix.replace("\x00", " ").split())
            if prefix in self.cached_prefixes:
                read = cached
            else:
                written = cached
                self.cached_prefixes.add(prefix)
        output = self.mock.completion(_limit(body, "max_tokens")).tokens
        hour = written if _writes_for_an_hour(body) else 0
        return {"input_tokens": prompt - read - written, "cache_creation_input_tokens": written,
                "cache_read_input_tokens": read, "output_tokens": output,
                "cache_creation": {"ephemeral_5m_input_tokens": written - hour, "ephemeral_1h_input_tokens": hour}}

    async def answer_messages(self, request: web.Request, body: Any, action: Action | None) -> web.StreamResponse:
        """Answer a Messages request, streaming when asked."""
        problem = _anthropic_problem(request, body)
        if problem is not None:
            return self.mock.json_response(problem[0], anthropic_error_json(*problem))
        usage, done = self.messages_usage(body), self.mock.completion(_limit(body, "max_tokens"))
        message = {"id": f"msg_{self.mock.name}_{self.mock.hits}", "type": "message", "role": "assistant",
                   "model": body["model"], "content": [{"type": "text", "text": done.text}],
                   "stop_reason": "end_turn" if done.finish_reason == "stop" else "max_tokens",
                   "stop_sequence": None, "usage": usage}
        billed = {"prompt_tokens": usage["input_tokens"] + usage["cache_read_input_tokens"]
                  + usage["cache_creation_input_tokens"], "completion_tokens": usage["output_tokens"],
                  "prompt_tokens_details": {"cached_tokens": usage["cache_read_input_tokens"]},
                  "cache_write_tokens": usage["cache_creation_input_tokens"],
                  "cache_write_1h_tokens": usage["cache_creation"]["ephemeral_1h_input_tokens"]}
        if body.get("stream"):
            return await self.stream(request, action, body["model"], billed, self.messages_events(message, done.pieces))
        return self.whole(body["model"], message, billed, action)

    @staticmethod
    def messages_events(message: JSON, pieces: tuple[str, ...]) -> tuple[list[bytes], list[bytes], list[bytes]]:
        """The stream's opening events, its deltas and its closing events."""
        usage = message["usage"]
        start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
        head = [_sse("message_start", {"type": "message_start", "message": start}),
                _sse("content_block_start", {"type": "content_block_start", "index": 0,
                                             "content_block": {"type": "text", "text": ""}}),
                _sse("ping", {"type": "ping"})]
        deltas = [_sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                               "delta": {"type": "text_delta", "text": piece}}) for piece in pieces]
        tail = [_sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
                _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": message["stop_reason"],
                                                                          "stop_sequence": None},
                                       "usage": {"output_tokens": usage["output_tokens"]}}),
                _sse("message_stop", {"type": "message_stop"})]
        return head, deltas, tail

    # -- shared ------------------------------------------------------------------------------------------

    def whole(self, model: str, answer: JSON, billed: JSON, action: Action | None) -> web.Response:
        """A whole answer (usage dropped under `omit_usage`), billed when it reports usage."""
        headers = {**self.mock._headers, **action.headers} if action else self.mock._headers
        if action is not None and action.omit_usage:
            answer = {name: value for name, value in answer.items() if name != "usage"}
        else:
            self.mock.billed.add(model, billed)
        return self.mock.json_response(200, answer, headers)

    async def stream(self, request: web.Request, action: Action | None, model: str, billed: JSON,
                     events: tuple[list[bytes], list[bytes], list[bytes]]) -> web.StreamResponse:
        """Send the events one by one: cut after `truncate_after` deltas, endless deltas under `endless`."""
        head, deltas, tail = events
        headers = {**self.mock._headers, **(action.headers if action else {}), **_SSE_HEADERS}
        resp = web.StreamResponse(headers=headers)
        cut = action.truncate_after if action else None
        try:
            await resp.prepare(request)
            for event in head:
                await self.send(request, resp, event)
            for i, event in enumerate(deltas):
                if cut is not None and i >= cut:
                    return _abort(request, resp)
                await self.send(request, resp, event)
            while action is not None and action.endless and not _disconnected(request):
                await self.send(request, resp, deltas[-1])
            for event in tail:
                await self.send(request, resp, event)
            await resp.write_eof()
        except ConnectionError:
            return resp
        self.mock.billed.add(model, billed)
        return resp

    @staticmethod
    async def send(request: web.Request, resp: web.StreamResponse, event: bytes) -> None:
        """Write one event and wait until the transport has taken it."""
        await resp.write(event)
        await request.writer.drain()


def _limit(body: JSON, name: str) -> int | None:
    limit = body.get(name)
    return limit if isinstance(limit, int) and limit >= 0 else None


def _openai_error(status: int, message: str) -> JSON:
    return _error_json(status, message)


def _anthropic_problem(request: web.Request, body: Any) -> tuple[int, str] | None:
    """What Anthropic would refuse in this call: a missing key or version, a body without model, messages or
    max_tokens."""
    if not request.headers.get("x-api-key"):
        return 401, "x-api-key header is required"
    if not request.headers.get("anthropic-version"):
        return 400, "anthropic-version header is required"
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body.get("messages"):
        return 400, "model and messages are required"
    if not isinstance(body.get("max_tokens"), int):
        return 400, "max_tokens: Field required"
    return None


def add_api_routes(app: web.Application, mock: MockUpstream, answers: _Answers) -> None:
    """Serve /v1/responses and /v1/messages on a mock's app."""
    api = ApiAnswers(mock, answers)
    app.router.add_post("/v1/responses", api.responses)
    app.router.add_post("/v1/messages", api.messages)
