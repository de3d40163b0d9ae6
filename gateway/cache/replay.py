"""A whole cached answer sent as the SSE events a provider sends: a role chunk, the content split into
events, the finish chunk, the usage chunk only when the client asked for it, then `[DONE]`."""

from __future__ import annotations

import re
from typing import Any

import orjson

from gateway.cache.assemble import usage_block
from gateway.domain.pricing import Usage

__all__ = ["PIECE_CHARS", "MAX_PIECES", "pieces", "replay_events"]

JSON = dict[str, Any]
PIECE_CHARS = 16    # text is cut between words into events of about this many characters,
MAX_PIECES = 1024   # or into about this many longer ones (a long answer's replay stays a few times its bytes)
_NEXT_WORD = re.compile(r"\s+(?=\S)")
_DONE = b"data: [DONE]\n\n"


def pieces(text: str) -> list[str]:
    """`text` cut between words into pieces of at least PIECE_CHARS characters (or 1/MAX_PIECES of it, when
    longer), each ending with the spaces after its last word; joined, they are `text`."""
    size = max(PIECE_CHARS, len(text) // MAX_PIECES)
    out: list[str] = []
    start = 0
    while start < len(text):
        found = _NEXT_WORD.search(text, start + size - 1)   # the spaces before the next word, from `size` on
        end = len(text) if found is None else found.end()
        out.append(text[start:end])
        start = end
    return out


def replay_events(body: bytes, usage: Usage, wants_usage: bool) -> bytes | None:
    """The SSE stream of a chat or completions answer; None for an answer that has no stream form."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
        return None
    kind = answer.get("object")
    if kind == "chat.completion":
        base = _base(answer, "chat.completion.chunk")
        chunks = [chunk for choice in answer["choices"] for chunk in _chat_chunks(base, choice)]
    elif kind == "text_completion":
        base = _base(answer, "text_completion")
        chunks = [chunk for choice in answer["choices"] for chunk in _text_chunks(base, choice)]
    else:
        return None
    if wants_usage:
        block = answer.get("usage")
        chunks.append({**base, "choices": [], "usage": block if isinstance(block, dict) else usage_block(usage)})
    return b"".join([b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks]) + _DONE


def _base(answer: JSON, kind: str) -> JSON:
    """What every chunk repeats: id, object, created, model (and the fingerprint when there is one)."""
    base = {"id": answer.get("id"), "object": kind, "created": answer.get("created"), "model": answer.get("model")}
    if answer.get("system_fingerprint") is not None:
        base["system_fingerprint"] = answer["system_fingerprint"]
    return base


def _chat_chunks(base: JSON, choice: JSON) -> list[JSON]:
    """One chat choice as chunks: role, reasoning, content (with its logprobs in one piece), tool calls, finish."""
    index, message = choice.get("index", 0), choice.get("message") or {}

    def chunk(delta: JSON, finish_reason: str | None = None, logprobs: Any = None) -> JSON:
        return {**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": finish_reason}]}

    content, logprobs = message.get("content"), choice.get("logprobs")
    chunks = [chunk({"role": message.get("role", "assistant"), "content": "" if isinstance(content, str) else None})]
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str):
        chunks += [chunk({"reasoning_content": piece}) for piece in pieces(reasoning)]
    if isinstance(content, str) and content:
        parts = [content] if logprobs is not None else pieces(content)
        chunks += [chunk({"content": part}, logprobs=logprobs) for part in parts]
    for position, call in enumerate(message.get("tool_calls") or ()):
        chunks.append(chunk({"tool_calls": [{"index": position, **call}]}))
    if message.get("function_call") is not None:
        chunks.append(chunk({"function_call": message["function_call"]}))
    chunks.append(chunk({}, choice.get("finish_reason")))
    return chunks


def _text_chunks(base: JSON, choice: JSON) -> list[JSON]:
    """One completions choice as chunks of its text, then its finish."""
    index, text = choice.get("index", 0), choice.get("text") or ""

    def chunk(piece: str, finish_reason: str | None = None) -> JSON:
        return {**base, "choices": [{"text": piece, "index": index, "logprobs": None, "finish_reason": finish_reason}]}

    return [*(chunk(piece) for piece in pieces(text)), chunk("", choice.get("finish_reason"))]
