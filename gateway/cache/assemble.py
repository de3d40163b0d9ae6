"""Putting a relayed stream back together as the whole answer it stands for, and which answers may be kept.

Fed the bytes as the stream is relayed and joined a slice at a time (a stream that relays more than its
limit is given up, its bytes let go). A chat stream's deltas are joined per choice (content, reasoning,
tool calls by index, a legacy function call), a completions stream's text per choice; the usage block is
the one the stream was charged on. A chunk the gateway does not understand (a data line that is no JSON
value, a delta field it does not know, completions logprobs) makes the stream unstorable rather than
stored half-understood.

Never kept: answers that are no JSON object, and refusals (a choice with a `refusal` or finish_reason
`content_filter`): a filter that tripped once should not answer the same prompt for an hour.
"""

from __future__ import annotations

from typing import Any

import re

import orjson

from gateway.domain.pricing import Usage

__all__ = ["usage_block", "storable", "storable_answer", "StreamAssembler"]

JSON = dict[str, Any]
_TOP = ("id", "created", "model", "system_fingerprint", "service_tier")
_JOINED = frozenset(("content", "refusal", "reasoning_content"))
_CHAT = "chat.completion.chunk"
_DATA, _NEXT_DATA = b"data: ", b"\n\ndata: "
SLICE_BYTES = 64 * 1024   # relayed bytes a stream keeps before it joins them (see StreamAssembler)
PIECES = 1024             # pieces of a text kept before they are joined (see _add_piece)
# a refusal's marks as keys of the answer (a quote inside a JSON string is escaped, so `"refusal"` followed
# by `:` is a key, never text): chat's, the Responses API's refusal content and Anthropic's stop reason
_REFUSED = re.compile(rb'"finish_reason"\s*:\s*"content_filter"|"refusal"\s*:(?!\s*null)'
                      rb'|"type"\s*:\s*"refusal"|"stop_reason"\s*:\s*"refusal"')


class _Unstorable(Exception):
    """A chunk the gateway does not understand well enough to store."""


def usage_block(usage: Usage) -> JSON:
    """An OpenAI usage block of `usage`."""
    block: JSON = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                   "total_tokens": usage.total_tokens}
    if usage.cached_tokens:
        block["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    return block


def storable_answer(body: bytes) -> bool:
    """`storable` of a whole answer the gateway already read as JSON (its usage), without parsing it again:
    an object without a refusal's marks."""
    return body[:1] == b"{" and _REFUSED.search(body) is None   # one pass (faster than substring counts)


def storable(answer: Any) -> bool:
    """Whether a whole answer may be kept: a JSON object whose choices hold no refusal."""
    if not isinstance(answer, dict):
        return False
    choices = answer.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict) or choice.get("finish_reason") == "content_filter":
            return False
        message = choice.get("message")
        if isinstance(message, dict) and message.get("refusal"):
            return False
    return True


class StreamAssembler:
    """Joins a stream's chunks into its whole answer (fed the SSE bytes as written), up to `limit` bytes relayed
    (past it the stream is given up); `answer` is the whole answer of a complete stream, or None.

    Feeding keeps the bytes and joins them a slice of SLICE_BYTES at a time (the whole events in it, each
    data line parsed on its own by orjson, without a pass per event in Python for the usual stream);
    `answer` joins the rest. So a short stream is parsed once, at its end, and a long one never holds more
    than a slice of bytes and of parsed chunks.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._size = 0                           # bytes relayed before the last slice
        self._parts: list[bytes] | None = []     # not joined yet; None: given up
        self._kept = 0                           # bytes relayed since the last slice
        self._joined = _Joined()
        self._done = False                       # a [DONE] ended the events joined so far

    def feed(self, data: bytes) -> None:
        """Keep the bytes written to the client; join them once a slice is kept."""
        parts = self._parts
        if parts is not None:
            parts.append(data)
            self._kept += len(data)
            if self._kept > SLICE_BYTES:
                self._slice(parts)

    def _slice(self, parts: list[bytes]) -> None:
        """Join the whole events kept (past the limit, give the stream up)."""
        self._size += self._kept
        self._kept = 0
        if self._size > self._limit:
            self._parts = None
            return
        kept = b"".join(parts)
        cut = kept.rfind(b"\n\n") + 2         # whole events only; the rest waits for the next feeds
        if cut > 1:
            self._parts = [kept[cut:]]
            self._join(kept[:cut])
        else:                                  # one event longer than a slice: try again a slice later
            self._parts = [kept]

    def answer(self, usage: Usage) -> bytes | None:
        """The whole answer with `usage` as its usage block; None when it cannot be kept."""
        if self._parts is None or self._size + self._kept > self._limit:
            return None
        rest = b"".join(self._parts)
        if rest.rpartition(b"\n\n")[2].strip():   # an event cut short
            return None
        self._join(rest)
        if self._parts is None:
            return None
        try:
            answer = self._joined.answer(usage)
            return orjson.dumps(answer) if storable(answer) else None
        except (_Unstorable, orjson.JSONEncodeError):   # nested deeper than orjson writes
            return None

    def _join(self, events: bytes) -> None:
        """Join the whole events in `events` (anything not understood, or data after a [DONE], gives the
        stream up: its client stopped reading at the [DONE])."""
        lines, done = _data_lines(events)
        try:
            if self._done and lines:
                raise _Unstorable
            self._joined.add(list(map(orjson.loads, lines)))
        except (_Unstorable, orjson.JSONDecodeError):
            self._parts = None
        self._done = self._done or done


def _data_lines(events: bytes) -> tuple[list[bytes], bool]:
    """The data lines of whole SSE events, a [DONE] that ends them left out (one before their end is no JSON:
    the stream is not kept); and whether one did."""
    lines = events[len(_DATA):-2].split(_NEXT_DATA)
    # the usual events, each one `data: ` line: no pass over them in Python (a JSON text holds no raw newline)
    if not (events.startswith(_DATA) and events.endswith(b"\n\n") and b"\n" not in b"".join(lines)):
        lines = [line[5:] for event in events.split(b"\n\n") for line in event.split(b"\n") if line.startswith(b"data:")]
    if lines and lines[-1].strip() == b"[DONE]":
        lines.pop()
        return lines, True
    return lines, False


class _Joined:
    """A stream's answer so far: its kind, top-level fields and choices joined chunk by chunk (each text kept as
    its pieces, joined once at the end: adding to a string per chunk would copy it whole each time)."""

    def __init__(self) -> None:
        self.kind: str | None = None
        self.top: JSON = {}
        self.choices: dict[int, JSON] = {}
        self._part = _chat_part                # how a choice's part is joined: by the kind

    def add(self, chunks: list[Any]) -> None:
        """Join chunks into the answer."""
        choices = self.choices
        for chunk in chunks:
            if type(chunk) is not dict or chunk.get("error") is not None:
                raise _Unstorable
            if self.kind is None or chunk.get("object") != self.kind:
                self._start(chunk)
            parts = chunk.get("choices")
            if not parts:
                continue
            if type(parts) is not list:
                raise _Unstorable
            for part in parts:
                if type(part) is not dict:
                    raise _Unstorable
                index = part.get("index", 0)
                if type(index) is not int:
                    raise _Unstorable
                choice = choices.get(index)
                if choice is None:
                    choice = choices[index] = {}
                self._part(choice, part)

    def _start(self, chunk: JSON) -> None:
        """The first chunk says the stream's kind and top-level fields (a later chunk of another kind: not
        understood)."""
        kind = chunk.get("object")
        if self.kind is not None or kind not in (_CHAT, "text_completion"):
            raise _Unstorable
        self.kind, self._part = kind, _chat_part if kind == _CHAT else _text_part
        self.top = {name: chunk[name] for name in _TOP if chunk.get(name) is not None}

    def answer(self, usage: Usage) -> JSON:
        """The whole answer, with `usage` as its usage block."""
        kind, choices = self.kind, self.choices
        if kind is None:
            raise _Unstorable
        return {**self.top, "object": "chat.completion" if kind == _CHAT else "text_completion",
                "choices": [_finished(index, choices[index], kind) for index in sorted(choices)],
                "usage": usage_block(usage)}


def _chat_part(choice: JSON, part: JSON) -> None:
    """Join one chat delta into its choice."""
    delta = part.get("delta")
    if delta:
        if type(delta) is not dict:
            raise _Unstorable
        for name, value in delta.items():
            if value is None:
                continue
            if name in _JOINED and type(value) is str:
                _add_piece(choice, name, value)
            elif name == "role":
                choice["role"] = value
            elif name == "tool_calls" and type(value) is list:
                _join_tool_calls(choice.setdefault("tool_calls", {}), value)
            elif name == "function_call" and type(value) is dict:
                _join_call(choice.setdefault("function_call", {}), value)
            else:
                raise _Unstorable
    reason = part.get("finish_reason")
    if reason is not None:
        choice["finish_reason"] = reason
    logprobs = part.get("logprobs")
    if logprobs is not None:
        if type(logprobs) is not dict or type(logprobs.get("content")) is not list:
            raise _Unstorable
        choice.setdefault("logprobs", {"content": []})["content"].extend(logprobs["content"])


def _text_part(choice: JSON, part: JSON) -> None:
    """Join one completions piece into its choice."""
    text = part.get("text")
    if part.get("logprobs") is not None or not isinstance(text, str | None):
        raise _Unstorable
    _add_piece(choice, "text", text or "")
    if part.get("finish_reason") is not None:
        choice["finish_reason"] = part["finish_reason"]


def _add_piece(joined: JSON, name: str, piece: str) -> None:
    """Keep `piece` of the text `name`: a first piece as it is, more in a list (joined by `_text`; every PIECES of
    them joined so far, so that a long stream's text is not held as many times its bytes)."""
    text = joined.get(name)
    if text is None:
        joined[name] = piece
    elif type(text) is str:
        joined[name] = [text, piece]
    else:
        text.append(piece)
        if len(text) == PIECES:
            text[:] = ("".join(text),)


def _text(joined: JSON, name: str, default: str | None = "") -> str | None:
    """The text `name` joined from its pieces (`default` when it had none)."""
    text = joined.get(name)
    return default if text is None else text if type(text) is str else "".join(text)


def _join_tool_calls(calls: dict[int, JSON], deltas: list[Any]) -> None:
    """Tool call deltas joined by their index: id and type kept, function name and arguments joined."""
    for delta in deltas:
        if type(delta) is not dict or type(delta.get("index")) is not int:
            raise _Unstorable
        call = calls.setdefault(delta["index"], {})
        for name in ("id", "type"):
            if delta.get(name) is not None:
                call[name] = delta[name]
        function = delta.get("function")
        if function is not None:
            if not isinstance(function, dict):
                raise _Unstorable
            _join_call(call.setdefault("function", {}), function)


def _join_call(call: JSON, delta: JSON) -> None:
    """A function call's name and arguments joined."""
    for name in ("name", "arguments"):
        value = delta.get(name)
        if value is not None:
            if not isinstance(value, str):
                raise _Unstorable
            _add_piece(call, name, value)


def _joined_call(call: JSON) -> JSON:
    """A function call with its name and arguments joined."""
    return {name: _text(call, name) for name in call}


def _tool_call(call: JSON) -> JSON:
    """A tool call in the whole answer's shape, its function's name and arguments joined."""
    joined = {"type": "function", **call}
    if "function" in call:
        joined["function"] = _joined_call(call["function"])
    return joined


def _finished(index: int, choice: JSON, kind: str) -> JSON:
    """A joined choice in the whole answer's shape."""
    finish_reason = choice.get("finish_reason")
    if kind != _CHAT:
        return {"text": _text(choice, "text"), "index": index, "logprobs": None, "finish_reason": finish_reason}
    message: JSON = {"role": choice.get("role", "assistant"), "content": _text(choice, "content", None)}
    if "tool_calls" in choice:
        message["tool_calls"] = [_tool_call(call) for _, call in sorted(choice["tool_calls"].items())]
    elif message["content"] is None:
        message["content"] = ""
    if "function_call" in choice:
        message["function_call"] = _joined_call(choice["function_call"])
    for name in ("reasoning_content", "refusal"):
        if name in choice:
            message[name] = _text(choice, name)
    message.setdefault("refusal", None)
    return {"index": index, "message": message, "logprobs": choice.get("logprobs"), "finish_reason": finish_reason}
