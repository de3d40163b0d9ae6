"""Client authentication: a bearer key maps to a caller identity by its SHA-256 digest."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from aiohttp import web

from gateway.config.digest import key_digest
from gateway.config.model import ADMIN_CALLER, LOCAL_CALLER, CallerIdentity, Settings
from gateway.errors import Unauthorized

__all__ = ["LOCAL_CALLER", "ADMIN_CALLER", "key_digest", "token_digest", "authenticate", "KnownTokens",
           "TokenReader", "bearer_token", "anthropic_token"]

MAX_KNOWN_TOKENS = 1024
TokenReader = Callable[[web.Request], "str | None"]
"""Where an endpoint's clients send their key."""


def token_digest(token: str) -> str | None:
    """The digest of a token a client sent; None when it is no text at all (undecodable header bytes)."""
    try:
        return key_digest(token)
    except UnicodeEncodeError:
        return None


def bearer_token(request: web.Request) -> str | None:
    """The token of an `Authorization: Bearer ...` header, if any."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def anthropic_token(request: web.Request) -> str | None:
    """The key an Anthropic client sends: `x-api-key`, else an `Authorization: Bearer` token."""
    key = request.headers.get("x-api-key", "").strip()
    return key or bearer_token(request)


_HOW_TO_SEND: dict[TokenReader, str] = {anthropic_token: "'x-api-key: <key>' or 'Authorization: Bearer <key>'"}


def identify(settings: Settings, token: str | None) -> CallerIdentity | None:
    """The caller a token belongs to, or None when the token is unknown."""
    if token is None:
        return None
    digest = token_digest(token)
    if digest is None:
        return None
    admin = settings.server.admin_key_sha256
    if admin and hmac.compare_digest(admin, digest):
        return ADMIN_CALLER
    # The lookup is by digest, which an attacker cannot steer byte by byte; the final
    # comparison is still constant-time.
    entry = settings.key_index.get(digest)
    if entry is not None and hmac.compare_digest(entry.sha256, digest):
        return entry.identity
    return None


class KnownTokens:
    """Tokens already matched to their caller under one Settings, so a returning caller skips the digest.

    Only tokens that matched are kept (at most MAX_KNOWN_TOKENS), and the lookup is by the token's
    salted string hash, which an attacker cannot steer byte by byte.
    """

    def __init__(self) -> None:
        self._settings: Settings | None = None
        self._callers: dict[str, CallerIdentity] = {}

    def identify(self, settings: Settings, token: str | None) -> CallerIdentity | None:
        """`identify(settings, token)`, remembered until a reload swaps the Settings."""
        if settings is not self._settings:
            self._settings, self._callers = settings, {}
        if token is None:
            return None
        caller = self._callers.get(token)
        if caller is None:
            caller = identify(settings, token)
            if caller is not None and len(self._callers) < MAX_KNOWN_TOKENS:
                self._callers[token] = caller
        return caller


def authenticate(request: web.Request, settings: Settings, known: KnownTokens | None = None,
                 read_token: TokenReader = bearer_token) -> CallerIdentity:
    """The caller of `request` (its key where `read_token` finds it); raises Unauthorized for a missing or unknown key."""
    token = read_token(request)
    caller = identify(settings, token) if known is None else known.identify(settings, token)
    if caller is not None:
        return caller
    if settings.server.auth == "none":
        return LOCAL_CALLER
    if token is None:
        raise Unauthorized(f"Missing API key: send {_HOW_TO_SEND.get(read_token, repr('Authorization: Bearer <key>'))}.")
    raise Unauthorized("Incorrect API key provided.")
