"""The end user and session a request is made for: the application's own user, not the calling key.

The end user is the OpenAI `user` field of the body (on /v1/messages Anthropic's `metadata.user_id`), or the
`x-gateway-user` header when it is set (the header wins: a proxy in front of the application may know the user better than the body says); the
session is the `x-gateway-session` header. Both are checked here (a string of 1 to MAX_ID_CHARS
printable characters) and then only stored in the ledger and counted by `each: user` policies: never a
metric label.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import InvalidRequest

__all__ = ["MAX_ID_CHARS", "USER_HEADER", "SESSION_HEADER", "end_user", "checked_id"]

MAX_ID_CHARS = 256
USER_HEADER = "x-gateway-user"
SESSION_HEADER = "x-gateway-session"


def checked_id(value: Any, param: str) -> str | None:
    """`value` when it is a usable id; None when absent or empty; InvalidRequest when it is not one."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"'{param}' must be a string.", param=param)
    if len(value) > MAX_ID_CHARS or not value.isprintable():
        raise InvalidRequest(f"'{param}' must be 1 to {MAX_ID_CHARS} printable characters.", param=param)
    return value


def end_user(payload: dict[str, Any], user_header: str | None, messages: bool = False) -> str | None:
    """The request's end user: the header when set, else the body's `user` (Anthropic Messages:
    `metadata.user_id`), both checked."""
    if user_header:
        return checked_id(user_header, USER_HEADER)
    if messages:
        metadata = payload.get("metadata")
        field = metadata.get("user_id") if isinstance(metadata, dict) else None
        return None if field is None else checked_id(field, "metadata.user_id")
    field = payload.get("user")
    return None if field is None else checked_id(field, "user")
