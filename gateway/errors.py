"""The gateway's exception tree and OpenAI-shaped error bodies.

GatewayError                      -> an HTTP error answered in OpenAI's error shape
 ├── InvalidRequest        400    invalid_request_error (malformed JSON, missing model, ...)
 ├── Unauthorized          401    invalid_api_key
 ├── NotFound              404    model_not_found / policy_not_found
 ├── RequestTimeout        408    the client was too slow to send its body
 ├── PayloadTooLarge       413
 ├── UnsupportedMediaType  415
 ├── BudgetExceeded        429    budget_exceeded (x-should-retry: false, Retry-After)
 ├── RateLimited           429    rate_limit_exceeded (x-should-retry: true, Retry-After; false when it never fits)
 ├── StoreUnavailable      503    budget_store_unavailable
 ├── WorkerUnavailable     503    worker_unavailable (a sibling worker did not answer for /metrics or status)
 └── UpstreamFailure       502/503/504/429  every provider failed
ConfigError                        -> invalid configuration; lists every problem with file and key path
StoreError                         -> the budget store could not be reached or answered badly
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "GatewayError", "InvalidRequest", "Unauthorized", "NotFound", "RequestTimeout", "PayloadTooLarge",
    "UnsupportedMediaType", "BudgetExceeded", "RateLimited", "StoreUnavailable", "WorkerUnavailable", "UpstreamFailure",
    "ConfigError", "ConfigIssue", "StoreError", "error_body",
]


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class GatewayError(Exception):
    """An error the gateway answers itself, in OpenAI's error shape."""

    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body sent to the client."""
        return error_body(self.message, self.type, self.code, self.param)


class InvalidRequest(GatewayError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class Unauthorized(GatewayError):
    status, type, code = 401, "invalid_request_error", "invalid_api_key"


class NotFound(GatewayError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class RequestTimeout(GatewayError):
    status, type, code = 408, "invalid_request_error", "request_timeout"


class PayloadTooLarge(GatewayError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class UnsupportedMediaType(GatewayError):
    status, type, code = 415, "invalid_request_error", "unsupported_media_type"


class BudgetExceeded(GatewayError):
    status, type, code = 429, "budget_exceeded", "budget_exceeded"
    policy: str | None = None                # the refusing policy and period, a metrics label
    period: str | None = None


class RateLimited(GatewayError):
    """A rate limit or max_concurrent of a policy (or every provider's own rate limit) refused the request."""

    status, type, code = 429, "requests", "rate_limit_exceeded"
    policy: str | None = None                # the refusing policy, a metrics label
    provider: str | None = None              # or the provider whose own limit refused it (every one was full)
    kind: str = "requests"                   # requests, tokens or concurrent, a metrics label


class StoreUnavailable(GatewayError):
    status, type, code = 503, "budget_store_unavailable", "budget_store_unavailable"


class WorkerUnavailable(GatewayError):
    status, type, code = 503, "server_error", "worker_unavailable"


class UpstreamFailure(GatewayError):
    status, type, code = 502, "upstream_error", "upstream_error"

    def __init__(self, message: str, *, upstream_body: dict[str, Any] | None = None, attempts: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.upstream_body = upstream_body
        self.attempts = attempts             # upstream calls made when no provider answered (x-gateway-attempts)
        if attempts is not None:
            self.headers["x-gateway-attempts"] = str(attempts)

    def body(self) -> dict[str, Any]:
        """The upstream's own OpenAI-shaped error (already redacted) when it sent one, else the gateway's."""
        return self.upstream_body or super().body()


class StoreError(Exception):
    """The budget store failed (connection, timeout, bad reply); the driver's error is chained."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in the configuration: which file, which key path, what is wrong."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}" if self.path else self.file
        return f"{where}: {self.message}"


@dataclass
class ConfigError(Exception):
    """The configuration is invalid; `issues` lists every problem found."""

    issues: list[ConfigIssue] = field(default_factory=list)

    def __str__(self) -> str:
        return "invalid configuration:\n" + "\n".join(f"  {issue}" for issue in self.issues)
