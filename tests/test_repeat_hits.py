"""The memory of requests served from the cache (gateway.http.repeat_hits): bounded, and one config's only."""

from __future__ import annotations

import dataclasses

from gateway.config.model import CallerIdentity
from gateway.domain.request import ENDPOINTS, parse_request
from gateway.http.repeat_hits import RepeatHits, Ticket, WireKey
from tests.support.settings import make_settings

SETTINGS = make_settings({"primary": "http://127.0.0.1:9/v1"})
CALLER = CallerIdentity("web-app", team="web")


def wire(n: int, size: int = 100) -> WireKey:
    body = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"%s"}]}' % (b"%d" % n).ljust(size, b" ")
    return ("chat", "sk-1", None, None, None, "application/json", body)


def ticket(key: WireKey) -> Ticket:
    return Ticket(CALLER, parse_request(ENDPOINTS["chat"], key[-1]), "gpt-4o-mini", f"key-{len(key[-1])}")


def test_the_oldest_requests_go_first_past_the_count_or_the_bytes_bound() -> None:
    repeats = RepeatHits(max_requests=3, max_body_bytes=9_200)
    keys = [wire(n) for n in range(5)]
    for key in keys:
        repeats.remember(SETTINGS, key, ticket(key))
    assert [repeats.find(SETTINGS, key) is not None for key in keys] == [False, False, True, True, True]

    big = wire(9, size=9_000)
    repeats.remember(SETTINGS, big, ticket(big))
    assert len(repeats) == 1 and repeats.find(SETTINGS, big) is not None      # the rest made room for its bytes
    huge = wire(10, size=20_000)
    repeats.remember(SETTINGS, huge, ticket(huge))
    assert repeats.find(SETTINGS, huge) is None and repeats.find(SETTINGS, big) is not None


def test_a_new_config_forgets_every_request_of_the_old_one() -> None:
    repeats, key = RepeatHits(), wire(1)
    repeats.remember(SETTINGS, key, ticket(key))
    reloaded = dataclasses.replace(SETTINGS)
    assert repeats.find(SETTINGS, key) is not None and repeats.find(reloaded, key) is None
    other = wire(2)
    repeats.remember(reloaded, other, ticket(other))
    assert repeats.find(reloaded, other) is not None and repeats.find(SETTINGS, key) is None
    assert len(repeats) == 1
