"""The value types config fields share: names, digests, URLs, time zones, durations, paths; each with its rule."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any
from urllib.parse import SplitResult, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo

from gateway.config.base import file_context

__all__ = [
    "PATTERN_MESSAGES", "Name", "Sha256", "HttpUrl", "Webhook", "RedisUrl", "TimeZone", "Seconds", "Share", "Count",
    "Fraction", "Money", "Path",
]

_NAME = r"^[A-Za-z0-9_.-]+$"
_SHA256 = r"^[0-9a-fA-F]{64}$"
PATTERN_MESSAGES = {     # what a value that does not match each pattern must be
    _NAME: "must be a name of letters, digits, '_', '.' and '-'",
    _SHA256: "must be a SHA-256 hex digest (64 hex characters)",
}
_REDIS_SCHEMES = ("redis", "rediss", "redis+cluster", "redis+sentinel")


def _url_parts(text: str) -> SplitResult | None:
    """urlsplit's result, or None when the URL cannot be parsed (a broken IPv6 host, a port out of range)."""
    try:
        parts = urlsplit(text)
        _ = parts.port
    except ValueError:
        return None
    return parts


def _http_url(text: str) -> str:
    """An http(s) URL with a host."""
    parts = _url_parts(text)
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL")
    return text


def _redis_url(text: str | None) -> str | None:
    """A Redis URL, or None for none or an empty string (the embedded store)."""
    if not text:
        return None
    parts = _url_parts(text)
    if parts is None or parts.scheme not in _REDIS_SCHEMES or not parts.netloc:
        raise ValueError("must be a redis://, rediss://, redis+cluster:// or redis+sentinel:// URL, or empty")
    return text


def _time_zone(name: str) -> str:
    """An IANA time zone name that zoneinfo knows."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError("unknown time zone: must be an IANA name such as UTC or Europe/Paris") from None
    return name


def _beside_the_file(path: str, info: ValidationInfo) -> str:
    """A path from a file, made relative to that file's directory; one set in code is kept as is."""
    context = file_context(info)
    return path if context is None else str(context.base_dir / path)


def _absent_if_empty(value: Any) -> Any:
    """None for an empty string (`${VAR:-}` with VAR unset)."""
    return None if value == "" else value


Name = Annotated[str, Field(pattern=_NAME)]
"""A provider, key or policy name."""
Sha256 = Annotated[str, Field(pattern=_SHA256), AfterValidator(str.lower)]
"""A SHA-256 hex digest, kept lowercase."""
_HTTP_SCHEMA = Field(json_schema_extra={"pattern": r"^(https?://|\$\{)"})   # or a ${VAR} reference
HttpUrl = Annotated[str, AfterValidator(_http_url), AfterValidator(lambda url: url.rstrip("/")), _HTTP_SCHEMA]
"""An http(s) URL with a host, without a trailing slash (a provider's base URL)."""
Webhook = Annotated[str, AfterValidator(_http_url), _HTTP_SCHEMA]
"""An http(s) URL with a host, kept as written."""
RedisUrl = Annotated[str | None, BeforeValidator(_absent_if_empty), AfterValidator(_redis_url)]
"""A Redis URL; empty means the embedded store."""
TimeZone = Annotated[str, AfterValidator(_time_zone)]
"""An IANA time zone name."""
Seconds = Annotated[float, Field(gt=0)]
"""A duration in seconds, more than zero."""
Share = Annotated[float, Field(ge=0)]
"""A duration, ratio or wait of zero or more."""
Count = Annotated[int, Field(ge=1)]
"""A number of things, at least one."""
Fraction = Annotated[Decimal, Field(gt=0, le=1)]
"""A share of a whole: more than 0, at most 1."""
Money = Annotated[Decimal, Field(ge=0)]
"""USD, exact, never negative."""
Path = Annotated[str, AfterValidator(_beside_the_file), Field(validate_default=True)]
"""A file path; in a file, relative to that file's directory."""
