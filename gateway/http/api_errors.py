"""Errors in the shape of the API a client speaks: Anthropic's on /v1/messages, OpenAI's everywhere else.

Anthropic's SDK raises by status (429 RateLimitError, ...) and obeys `x-should-retry` like OpenAI's, so the
status and headers of an error stay what they are; only the body changes shape:
`{"type": "error", "error": {"type": "rate_limit_error", "message": "..."}}`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ANTHROPIC_PREFIX", "anthropic_error", "shaped_for"]

ANTHROPIC_PREFIX = "/v1/messages"
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
                    413: "request_too_large", 415: "invalid_request_error", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI-shaped error body in Anthropic's shape, its type from the status."""
    error = body.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    fallback = "api_error" if status >= 500 else "invalid_request_error"
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES.get(status, fallback),
                                       "message": message if isinstance(message, str) else f"Error {status}"}}


def shaped_for(path: str, status: int, body: dict[str, Any]) -> dict[str, Any]:
    """`body` (OpenAI's shape) as the API at `path` shapes its errors."""
    return anthropic_error(status, body) if path.startswith(ANTHROPIC_PREFIX) else body
