"""A client's proxy request: only the fields the gateway needs, and the body as it will be forwarded.

The body forwarded is the parsed payload encoded again, never the client's raw bytes: a key sent twice
(`"model"`, `"max_tokens"`, or one nested in a message) is priced by the value orjson keeps, the last,
and an upstream whose parser keeps the first must not get the other one. Encoding a typical chat body
again costs ~0.2 us (~110 us for 1 MiB), less than any way of finding duplicate keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson

from gateway.domain.end_user import SESSION_HEADER, checked_id, end_user
from gateway.errors import InvalidRequest

__all__ = ["Endpoint", "ENDPOINTS", "ProxyRequest", "MAX_TOKENS_LIMIT", "parse_request", "upstream_body",
           "parse_payload", "checked_payload", "forwarded_body", "optional_int", "check_types",
           "media_type_of"]

MAX_TOKENS_LIMIT = 2**31 - 1     # the largest max_tokens passed on (OpenAI's own limit is an int32)


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI endpoint the gateway forwards."""

    kind: str            # chat | completions | embeddings | responses | messages (the ledger's `endpoint`)
    path: str            # appended to the provider's base_url
    streams: bool        # whether `"stream": true` is allowed
    api: str = "openai-chat"   # the wire API it speaks (a provider's `apis` entry)


ENDPOINTS = {
    "chat": Endpoint("chat", "/chat/completions", True),
    "completions": Endpoint("completions", "/completions", True),
    "embeddings": Endpoint("embeddings", "/embeddings", False),
}


class ProxyRequest(NamedTuple):
    """A validated client request."""

    endpoint: Endpoint
    body: bytes                  # `payload` encoded: what was priced, byte for byte
    payload: dict[str, Any]
    model: str
    stream: bool
    wants_usage: bool            # the client itself asked for the streamed usage chunk
    max_tokens: int | None
    user: str | None = None      # the end user (gateway.domain.end_user), never a metric label
    session: str | None = None


def media_type_of(content_type: str | None) -> str:
    """The media type of a Content-Type header value, lowercase, without parameters.

    (aiohttp's `request.content_type` parses the header with the email package: far dearer than this.)
    """
    if content_type is None:
        return "application/octet-stream"   # RFC 9110's default, as aiohttp reports it
    return content_type.partition(";")[0].strip().lower()


def parse_payload(body: bytes) -> dict[str, Any]:
    """The JSON object in `body`; anything else is a 400."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return payload


def forwarded_body(payload: dict[str, Any]) -> bytes:
    """The payload encoded for the upstream; 400 when it is nested too deeply to encode (orjson: 254 levels)."""
    try:
        return orjson.dumps(payload)
    except orjson.JSONEncodeError:
        raise InvalidRequest("The request body is nested too deeply.") from None


def optional_int(payload: dict[str, Any], *names: str) -> int | None:
    """The first of `names` given, checked to be an integer from 0 to MAX_TOKENS_LIMIT."""
    for name in names:
        value = payload.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS_LIMIT:
            raise InvalidRequest(f"'{name}' must be an integer from 0 to {MAX_TOKENS_LIMIT}.", param=name)
        return value
    return None


def check_types(payload: dict[str, Any]) -> None:
    """400 for a `stream` that is not a boolean, `stream_options` not an object, `n`/`best_of` not >= 1."""
    if payload.get("stream") is not None and not isinstance(payload["stream"], bool):
        raise InvalidRequest("'stream' must be a boolean.", param="stream")
    if payload.get("stream_options") is not None and not isinstance(payload["stream_options"], dict):
        raise InvalidRequest("'stream_options' must be an object.", param="stream_options")
    for name in ("n", "best_of"):
        value = payload.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidRequest(f"'{name}' must be a positive integer.", param=name)


def checked_payload(body: bytes) -> tuple[dict[str, Any], str]:
    """A client's JSON body with its model, its fields' types checked; InvalidRequest when it is not one, or when it
    asks for priority processing (billed above the price table's rates)."""
    payload = parse_payload(body)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest("You must provide a model parameter.", param="model")
    check_types(payload)
    if payload.get("service_tier") == "priority":
        raise InvalidRequest("'service_tier': 'priority' is not supported through the gateway: priority processing "
                             "is billed above the standard rates its price table holds, so budgets would count it "
                             "short.", param="service_tier")
    return payload, model


def parse_request(endpoint: Endpoint, body: bytes, user_header: str | None = None,
                  session_header: str | None = None) -> ProxyRequest:
    """The checked request for `endpoint` in a client's JSON body (with its end user and session headers);
    InvalidRequest when it is not one."""
    payload, model = checked_payload(body)
    stream = payload.get("stream") is True
    if stream and not endpoint.streams:
        raise InvalidRequest(f"Streaming is not supported on {endpoint.path}.", param="stream")
    if payload.get("web_search_options") is not None:   # as the Responses API's hosted tools are
        raise InvalidRequest("'web_search_options' is not supported through the gateway: a search's per-call fee "
                             "is not in the price table and its results are added to the input, so its cost "
                             "cannot be bounded before the call.", param="web_search_options")
    options = payload.get("stream_options")
    wants_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    max_tokens = optional_int(payload, "max_completion_tokens", "max_tokens")
    user = end_user(payload, user_header)
    session = checked_id(session_header, SESSION_HEADER) if session_header else None
    return ProxyRequest(endpoint, forwarded_body(payload), payload, model, stream, wants_usage, max_tokens, user,
                        session)


def upstream_body(req: ProxyRequest, upstream_model: str | None) -> bytes:
    """The bytes to send upstream: `req.body` unless the model or usage option must change.

    Encoding the changed payload cannot fail: `forwarded_body` encoded it, and the changes add no depth
    past the second level.
    """
    rename = upstream_model is not None and upstream_model != req.model
    ask_usage = req.stream and not req.wants_usage
    if not rename and not ask_usage:
        return req.body
    payload = dict(req.payload)
    if rename:
        payload["model"] = upstream_model
    if ask_usage:
        options = payload.get("stream_options")
        payload["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return orjson.dumps(payload)
