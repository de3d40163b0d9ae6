"""The exact-match key of a request: a hash of its endpoint, client model, scope identity and canonical body."""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import orjson

from gateway.config.model import CallerIdentity

__all__ = ["IGNORED_FIELDS", "KEY_VERSION", "scope_identity", "canonical_body", "cache_key"]

IGNORED_FIELDS = frozenset(("stream", "stream_options", "user"))
"""Fields that do not change the answer: a streamed and a whole request share an entry."""
KEY_VERSION = b"gwcache-1"   # changes when what goes into a key changes, so old entries are never read


def scope_identity(scope: str, caller: CallerIdentity) -> str:
    """Whose requests share answers: one key's, one team's (a key without a team: its own), or everyone's."""
    if scope == "global":
        return "global"
    if scope == "team" and caller.team is not None:
        return "team:" + caller.team
    return "key:" + caller.name


def canonical_body(payload: dict[str, Any]) -> bytes:
    """The body with sorted keys and no whitespace, without the IGNORED_FIELDS (the client's own encoding
    of it cannot matter: it was parsed and is encoded again)."""
    if not IGNORED_FIELDS.isdisjoint(payload):
        payload = {name: value for name, value in payload.items() if name not in IGNORED_FIELDS}
    return orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)


def cache_key(endpoint: str, model: str, identity: str, payload: dict[str, Any]) -> str:
    """The hex SHA-256 of the key's parts, each length-prefixed so no two sets of parts run together."""
    body = canonical_body(payload)
    return hashlib.sha256(b"%b%d:%b" % (_head(endpoint, model, identity), len(body), body)).hexdigest()


@functools.lru_cache(maxsize=1024)    # the parts before the body: the same few come again and again
def _head(endpoint: str, model: str, identity: str) -> bytes:
    api, name, scope = endpoint.encode(), model.encode(), identity.encode()
    return b"%b%d:%b%d:%b%d:%b" % (KEY_VERSION, len(api), api, len(name), name, len(scope), scope)
