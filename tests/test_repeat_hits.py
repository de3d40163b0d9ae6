"""The memory of requests served from the cache (gateway.http.repeat_hits): bounded, and one config's only."""

from __future__ import annotations

import dataclasses
import hashlib

from gateway.config.model import CallerIdentity
from gateway.http.repeat_hits import MAX_BODY_BYTES, RepeatHits, Ticket, WireKey
from tests.support.settings import make_settings

SETTINGS = make_settings({"primary": "http://127.0.0.1:9/v1"})
CALLER = CallerIdentity("web-app", team="web")


def wire(n: int, cache_control: str | None = None) -> WireKey:
    return ("chat", "sk-1", None, None, cache_control, "application/json", hashlib.sha256(b"%d" % n).digest())


def ticket(n: int) -> Ticket:
    return Ticket(CALLER, "gpt-4o-mini", False, False, None, None, "gpt-4o-mini", f"key-{n}")


def test_the_oldest_requests_go_first_past_the_count_or_the_bytes_of_their_headers() -> None:
    repeats = RepeatHits(max_requests=3)
    for n in range(5):
        repeats.remember(SETTINGS, wire(n), ticket(n), 100)
    assert [repeats.find(SETTINGS, wire(n)) for n in range(5)] == [None, None, ticket(2), ticket(3), ticket(4)]

    repeats = RepeatHits(max_bytes=4_000)      # each key below holds ~1,500 bytes of header values
    for n in range(3):
        repeats.remember(SETTINGS, wire(n, "x" * 1_000), ticket(n), 100)
    assert [repeats.find(SETTINGS, wire(n, "x" * 1_000)) for n in range(3)] == [None, ticket(1), ticket(2)]
    repeats.remember(SETTINGS, wire(9, "x" * 5_000), ticket(9), 100)
    assert repeats.find(SETTINGS, wire(9, "x" * 5_000)) is None and len(repeats) == 2


def test_a_body_too_large_to_arrive_whole_is_not_remembered() -> None:
    repeats = RepeatHits()
    repeats.remember(SETTINGS, wire(1), ticket(1), MAX_BODY_BYTES + 1)
    repeats.remember(SETTINGS, wire(2), ticket(2), MAX_BODY_BYTES)
    assert (repeats.find(SETTINGS, wire(1)), repeats.find(SETTINGS, wire(2))) == (None, ticket(2))


def test_a_new_config_forgets_every_request_of_the_old_one_at_its_first_lookup() -> None:
    repeats = RepeatHits()
    repeats.remember(SETTINGS, wire(1), ticket(1), 100)
    reloaded = dataclasses.replace(SETTINGS)
    assert repeats.find(SETTINGS, wire(1)) == ticket(1)
    assert repeats.find(reloaded, wire(1)) is None and len(repeats) == 0     # the lane is off until a new hit
    repeats.remember(reloaded, wire(2), ticket(2), 100)
    assert repeats.find(reloaded, wire(2)) == ticket(2) and repeats.find(SETTINGS, wire(2)) is None
