"""A provider key echoed back encoded (JSON-escaped, percent-encoded) is scrubbed like the plain key, in JSON
answers, SSE events and error bodies; a client decoding what it got never sees it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from urllib.parse import unquote

import pytest

from gateway.config.model import RetryConfig
from gateway.mock_upstream import Action
from gateway.redact import REDACTED, Redactor
from tests.support.canary import CANARY_KEY
from tests.support.settings import make_settings

CHAT = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}
SLASHED_SECRET = "hdr/SECRET/0042/xyz"          # a configured header value with slashes, JSON-escapes as \/


def json_escaped(text: str, every: int = 1, upper: bool = False) -> str:
    """Every `every`-th character as \\uXXXX."""
    form = "\\u%04X" if upper else "\\u%04x"
    return "".join(form % ord(c) if i % every == 0 else c for i, c in enumerate(text))


def percent(text: str, every: int = 1, upper: bool = False) -> str:
    """Every `every`-th character as %XX."""
    form = "%%%02X" if upper else "%%%02x"
    return "".join(form % ord(c) if i % every == 0 else c for i, c in enumerate(text))


def mixed_case(text: str) -> str:
    """Every character JSON-escaped, the hex digits alternately in upper and lower case."""
    return "".join("\\u" + "".join(d.upper() if (i + j) % 2 else d for j, d in enumerate(f"{ord(c):04x}"))
                   for i, c in enumerate(text))


def json_and_percent(text: str) -> str:
    """Characters alternately JSON-escaped, percent-encoded and plain."""
    return "".join((json_escaped, percent, lambda c: c)[i % 3](c) for i, c in enumerate(text))


FORMS: dict[str, Callable[[str], str]] = {
    "first char \\u-escaped": lambda key: json_escaped(key[0]) + key[1:],
    "all \\u lower": json_escaped,
    "all \\u upper": lambda key: json_escaped(key, upper=True),
    "every 3rd \\u": lambda key: json_escaped(key, every=3),
    "\\u mixed hex case": mixed_case,
    "all %xx lower": percent,
    "all %XX upper": lambda key: percent(key, upper=True),
    "every 2nd %XX": lambda key: percent(key, every=2, upper=True),
    "\\u, %xx and plain": json_and_percent,
}


def views(body: bytes) -> list[str]:
    """What a client can make of a body: the raw text, each JSON document decoded, and all of it unquoted."""
    text = body.decode()
    documents = [line[6:] for line in text.splitlines() if line.startswith("data: {")] or [text]
    decoded = [json.dumps(json.loads(document), ensure_ascii=False) for document in documents]
    seen = [text, *decoded]
    return seen + [unquote(view) for view in seen]


def assert_scrubbed(body: bytes, secret: str = CANARY_KEY) -> None:
    """The secret is in none of the body's views, and the body says it redacted something."""
    for view in views(body):
        assert secret not in view and secret[:12] not in view, view
    assert REDACTED in body


def chat_answer(content: str) -> str:
    """A whole chat completion whose content is `content` (written into the JSON as given)."""
    return ('{"id":"c1","object":"chat.completion","model":"gpt-4.1","choices":[{"index":0,"message":'
            '{"role":"assistant","content":"key: ' + content + '"},"finish_reason":"stop"}],'
            '"usage":{"prompt_tokens":4,"completion_tokens":2,"total_tokens":6}}')


def sse_answer(content: str) -> str:
    """A stream whose one content event carries `content`, with usage and [DONE]."""
    chunk = ('{"id":"c1","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"key: '
             + content + '"}}]}')
    usage = '{"id":"c1","object":"chat.completion.chunk","choices":[],"usage":{"prompt_tokens":4,"completion_tokens":1}}'
    return f"data: {chunk}\n\ndata: {usage}\n\ndata: [DONE]\n\n"


def error_body(content: str) -> str:
    return '{"error":{"message":"invalid key ' + content + '","type":"invalid_request_error","param":null,' \
           '"code":"invalid_api_key"}}'


async def no_sleep(_seconds: float) -> None:
    """The gateway's retry sleep, without the wait."""


@pytest.fixture
async def gateway(upstream, start_gateway):
    """One provider using the canary key and a slashed secret header; no retries."""
    settings = make_settings({"primary": upstream.url}, retry=RetryConfig(max_retries=0))
    provider = dataclasses.replace(settings.providers["primary"], headers=(("api-key", SLASHED_SECRET),))
    return await start_gateway(dataclasses.replace(settings, providers={"primary": provider}), sleep=no_sleep)


# -- the redactor itself ------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", FORMS.values(), ids=FORMS.keys())
def test_every_encoded_form_of_a_key_is_redacted(form):
    redactor = Redactor([CANARY_KEY, SLASHED_SECRET])
    body = error_body(form(CANARY_KEY) + " and 100% sure, \\n no doubt").encode()
    scrubbed = redactor.bytes(body)
    assert_scrubbed(scrubbed)
    assert b"100% sure, \\n no doubt" in scrubbed                   # the rest is untouched


def test_a_slash_escaped_secret_is_redacted():
    escaped = SLASHED_SECRET.replace("/", "\\/")
    assert Redactor([SLASHED_SECRET]).bytes(f'{{"h":"{escaped}"}}'.encode()) == b'{"h":"[redacted]"}'


def test_text_with_no_encoded_secret_is_returned_as_it_was():
    body = error_body("\\u00e9t\\u00e9 50%25 \\/ \\u0073k-other").encode()
    assert Redactor([CANARY_KEY, SLASHED_SECRET]).bytes(body) is body


# -- through the gateway -------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", FORMS.values(), ids=FORMS.keys())
async def test_an_encoded_key_in_a_json_answer_never_reaches_the_client(gateway, upstream, http, form):
    upstream.script(Action(raw_body=chat_answer(form(CANARY_KEY))))
    reply = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)
    assert reply.status == 200
    assert_scrubbed(reply.body)


@pytest.mark.parametrize("form", FORMS.values(), ids=FORMS.keys())
async def test_an_encoded_key_in_an_sse_event_never_reaches_the_client(gateway, upstream, http, form):
    upstream.script(Action(raw_body=sse_answer(form(CANARY_KEY)), headers={"Content-Type": "text/event-stream"}))
    reply = await http(gateway, "POST", "/v1/chat/completions", json={**CHAT, "stream": True})
    assert reply.status == 200 and reply.body.endswith(b"data: [DONE]\n\n")
    assert_scrubbed(reply.body)


@pytest.mark.parametrize("status", [400, 429])
@pytest.mark.parametrize("form", FORMS.values(), ids=FORMS.keys())
async def test_an_encoded_key_in_an_error_body_never_reaches_the_client(gateway, upstream, http, form, status):
    upstream.script(Action(status=status, raw_body=error_body(form(CANARY_KEY))))
    reply = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)
    assert reply.status == status        # a 400 passes through as it came, a 429 as the last upstream error
    assert_scrubbed(reply.body)


async def test_a_slash_escaped_header_secret_never_reaches_the_client(gateway, upstream, http):
    upstream.script(Action(status=401, raw_body=error_body(SLASHED_SECRET.replace("/", "\\/"))))
    reply = await http(gateway, "POST", "/v1/chat/completions", json=CHAT)
    assert reply.status == 401
    assert_scrubbed(reply.body, SLASHED_SECRET)
