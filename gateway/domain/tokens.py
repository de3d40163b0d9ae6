"""Token counts the gateway works out itself, without a tokenizer on the hot path.

Prompt upper bound (for reservations): a BPE token always covers at least one byte of text, so the
UTF-8 byte length of every string in the prompt, plus a per-message overhead, bounds the real
token count from above. Image parts are bounded by a fixed allowance each; `file` and `input_audio`
parts by the byte length of their data (base64 or text), and never less than that allowance; a part
of a kind the gateway does not know (or a `type` a client made up) by the bytes of its strings, and
never less than that allowance either. A file part that points at its data (a file id or URL) is an
InvalidRequest: what it adds cannot be seen before the call; so is an assistant message's `audio`
(an earlier answer's audio, by its id, kept at the provider). The fields that reach the model
beside the prompt (`response_format`, `prediction`, `tools`, `functions`, `tool_choice`) count with
the byte length of their JSON. A body nested too deeply to walk is an InvalidRequest.

Completion estimate (for a stream that ended without usage): providers stream about one token per
content event, so the number of events that carried choices is the estimate; such records are
marked `estimated`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson

from gateway.config.model import IMAGE_TOKENS
from gateway.errors import InvalidRequest

__all__ = ["prompt_upper_bound", "PartKinds", "CHAT_PARTS", "parts_bound", "json_bytes", "MESSAGE_OVERHEAD_TOKENS",
           "NON_TEXT_PART_TOKENS", "EXTRA_PROMPT_FIELDS"]

MESSAGE_OVERHEAD_TOKENS = 8
NON_TEXT_PART_TOKENS = IMAGE_TOKENS   # an image's allowance unless its model's price says more
EXTRA_PROMPT_FIELDS = ("response_format", "prediction", "tools", "functions", "tool_choice")
_PROMPT_FIELDS = ("prompt", "suffix", "input")   # beside chat's messages: completions' and embeddings'
_REFERENCES = ("file_id", "file_url", "url")     # a data part that names one of these points at its data
_IMAGE = frozenset(("image_url", "source", "file_id"))   # where a media part holds its image (no text)


class PartKinds(NamedTuple):
    """How one API's typed parts (objects with a string `type`) bound their tokens.

    A kind not named counts the bytes of its strings, and with `floor_unknown` never less than the allowance:
    it may be media the gateway does not know, and a `type` a client made up must not shrink the bound.
    """

    media: frozenset[str]                    # the allowance each, plus their fields beside the image itself
    data: frozenset[str]                     # the bytes of their data, never less than the allowance (a PDF's
                                             # pages are images too)
    text: frozenset[str] = frozenset()       # the bytes of their strings
    floor_unknown: bool = False
    stateful: frozenset[str] = frozenset()   # refused: they stand for input kept at the provider
    json: frozenset[str] = frozenset()       # the bytes of their JSON: a client's objects (tool inputs), whose
                                             # `type` keys name no parts
    image_tokens: int = NON_TEXT_PART_TOKENS   # the allowance of a media part (the model's price may say more)

    def for_images(self, image_tokens: int) -> PartKinds:
        """These kinds with `image_tokens` as each media part's allowance."""
        return self if image_tokens == self.image_tokens else self._replace(image_tokens=image_tokens)


CHAT_PARTS = PartKinds(media=frozenset(("image_url",)), data=frozenset(("file", "input_audio")),
                       text=frozenset(("text", "refusal", "function", "custom")), floor_unknown=True)


def parts_bound(value: Any, kinds: PartKinds) -> int:
    """Upper bound of tokens in any JSON value: bytes of its strings, allowances for media parts. InvalidRequest
    for a part whose input the gateway cannot see (data sent by reference, input kept at the provider);
    RecursionError or orjson.JSONEncodeError for a value nested too deeply."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode())
    if isinstance(value, list):
        return sum(parts_bound(item, kinds) for item in value)
    if not isinstance(value, dict):
        return 1 if value is not None else 0
    kind = value.get("type")
    if kind is None:
        return _strings(value, kinds)
    if type(kind) is not str:                    # a `type` that is no name: a kind the gateway does not know
        return _other(value, kinds)
    if kind in kinds.media:
        return kinds.image_tokens + sum(parts_bound(item, kinds) for name, item in value.items()
                                          if name not in _IMAGE)
    if kind in kinds.json:
        return len(orjson.dumps(value))
    if kind in kinds.stateful:
        raise InvalidRequest(f"Input items of type '{kind}' are not supported through the gateway: the input they "
                             "stand for is kept at the provider and cannot be bounded before the call.")
    if kind in kinds.data:
        if _by_reference(value):
            raise InvalidRequest(f"A '{kind}' part sent by reference (a file id or URL) is not supported through "
                                 "the gateway: its input cannot be bounded before the call. Send its data inline.")
        return max(kinds.image_tokens, _strings(value, kinds))
    return _strings(value, kinds) if kind in kinds.text else _other(value, kinds)


def _strings(part: dict[str, Any], kinds: PartKinds) -> int:
    """The bound of every key and value of a dict (a model may read the keys too: a tool call's action, say)."""
    return sum(parts_bound(name, kinds) + parts_bound(item, kinds) for name, item in part.items())


def _other(part: dict[str, Any], kinds: PartKinds) -> int:
    """The bound of a part of a kind not named in `kinds`."""
    strings = _strings(part, kinds)
    return max(kinds.image_tokens, strings) if kinds.floor_unknown else strings


def _by_reference(part: dict[str, Any]) -> bool:
    """Whether a data part points at its data (a file id or URL, on it or on an object in it) instead of holding it."""
    for holder in (part, *(value for value in part.values() if type(value) is dict)):
        if any(holder.get(name) for name in _REFERENCES):
            return True
    return False


def json_bytes(payload: dict[str, Any], names: tuple[str, ...] = EXTRA_PROMPT_FIELDS) -> int:
    """Bytes of the JSON of the fields `names` (sent to the model beside the prompt)."""
    total = 0
    for name in names:
        if name in payload:
            total += len(orjson.dumps(payload[name]))
    return total


def _messages_bytes(messages: list[Any], kinds: PartKinds) -> int:
    """`parts_bound` of a chat message list, with the usual message (text fields only) counted inline."""
    total = 0
    for message in messages:
        if type(message) is dict and message.get("audio"):
            raise InvalidRequest("An assistant message's 'audio' (an earlier answer's audio, by its id) is not "
                                 "supported through the gateway: the input it stands for is kept at the provider "
                                 "and cannot be bounded before the call.", param="messages")
        if type(message) is not dict or "type" in message:
            total += parts_bound(message, kinds)
            continue
        for item in message.values():
            if type(item) is str:
                total += len(item) if item.isascii() else len(item.encode())
            else:
                total += parts_bound(item, kinds)
    return total


def _prompt_bytes(payload: dict[str, Any], kinds: PartKinds) -> int:
    """The bound of the messages, prompt, suffix and input, with their per-message overhead: each one present is
    counted, whichever the endpoint reads (a server may read one another endpoint's request would carry)."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        total = _messages_bytes(messages, kinds) + MESSAGE_OVERHEAD_TOKENS * len(messages)
    else:
        total = MESSAGE_OVERHEAD_TOKENS + parts_bound(messages, kinds)
    for field in _PROMPT_FIELDS:
        if field in payload:
            total += parts_bound(payload[field], kinds)
    return total


def prompt_upper_bound(payload: dict[str, Any], image_tokens: int = NON_TEXT_PART_TOKENS) -> int:
    """An upper bound of the prompt tokens of a chat, completion or embedding request, each image counted
    `image_tokens`."""
    try:
        return _prompt_bytes(payload, CHAT_PARTS.for_images(image_tokens)) + json_bytes(payload)
    except (RecursionError, orjson.JSONEncodeError):
        raise InvalidRequest("The request body is nested too deeply.") from None
