"""Typed domain errors: what went wrong, in the product's terms, with no HTTP in sight.

Everything below the HTTP layer (the service, tuning, the rate limits) raises these. `softserve/api/errors.py`
is the one place that turns them into status codes and OpenAI-shaped bodies. Prompt-store errors are
translated once, by `from_store_error`.
"""

from __future__ import annotations

from softserve.store.types import PromptStoreError, QuotaExceeded

__all__ = [
    "ServiceError", "InvalidRequest", "Unauthenticated", "PermissionDenied", "NotFound", "Conflict", "TooLarge",
    "UnsupportedMediaType", "Unprocessable", "Overloaded", "ClientGone", "InternalError", "NotReady", "Timeout",
    "from_store_error", "not_ready",
]


class ServiceError(Exception):
    """`param`: the request field at fault; `code`: a stable machine-readable reason; `retry_after`:
    seconds after which the same call may succeed (overload, not ready)."""

    default_code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after = retry_after


class InvalidRequest(ServiceError):
    """Malformed or out-of-range input: fix the request."""


class Unauthenticated(ServiceError):
    default_code = "invalid_api_key"


class PermissionDenied(ServiceError):
    default_code = "forbidden"


class NotFound(ServiceError):
    """Missing, or not visible to this tenant (the two are never told apart)."""


class Conflict(ServiceError):
    """The target's state forbids it (a finished job, a concurrent update that kept losing)."""


class TooLarge(ServiceError):
    default_code = "upload_too_large"


class UnsupportedMediaType(ServiceError):
    default_code = "unsupported_media_type"


class Unprocessable(ServiceError):
    """Well-formed but unusable here (e.g. an adapter for another model's shape)."""


class Overloaded(ServiceError):
    """A queue, a quota or a rate limit is full: the same request may succeed after `retry_after`."""


class ClientGone(ServiceError):
    """The client went away before the answer: nobody reads it; counted as the client's doing."""

    default_code = "client_closed"


class InternalError(ServiceError):
    """Our fault: a bug, corrupt data, a failed generation step."""


class NotReady(ServiceError):
    """Loading, shutting down, or the engine is not running."""

    default_code = "not_ready"


class Timeout(ServiceError):
    default_code = "timeout"


def not_ready(reason: str = "model is loading, not ready yet") -> NotReady:
    return NotReady(reason, retry_after=5)


_BY_STORE_STATUS: dict[int, type[ServiceError]] = {
    400: InvalidRequest, 404: NotFound, 409: Conflict, 413: TooLarge, 415: UnsupportedMediaType,
    422: Unprocessable, 429: Overloaded, 503: NotReady,
}


def from_store_error(exc: PromptStoreError, param: str | None = None) -> ServiceError:
    """The one translation of a prompt-store error (the store names its kind by a status class)."""
    kind = _BY_STORE_STATUS.get(exc.status_code, InternalError)
    # A quota (429 prompt_quota_exceeded) frees only when the tenant deletes something: no Retry-After.
    retry_after = 1 if kind in (Overloaded, NotReady) and not isinstance(exc, QuotaExceeded) else None
    return kind(exc.message, param=param if kind is not InternalError else None, code=exc.code, retry_after=retry_after)
