"""The client's exceptions, parsed from the OpenAI error shape `{"error": {"message", "type", "param", "code"}}`
(an HTTP error answer or an error sent inside an SSE stream)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx


class SoftserveError(Exception):
    """Base of every client error. `status_code` is None for errors without an HTTP status
    (connection failures, errors reported inside an SSE stream whose type is unknown)."""

    def __init__(self, message: str, *, status_code: int | None = None, code: str | None = None,
                 param: str | None = None, type: str | None = None, body: Any = None,
                 headers: Mapping[str, str] | None = None, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.param = param
        self.type = type
        self.body = body
        self.headers = dict(headers or {})
        self.request_id = request_id

    def __str__(self) -> str:
        parts = [f"{self.status_code}" if self.status_code is not None else None,
                 f"[{self.code}]" if self.code else None, self.message]
        return " ".join(p for p in parts if p)


class APIConnectionError(SoftserveError):
    """The server could not be reached (after retries), or the connection broke."""


class APITimeoutError(APIConnectionError):
    """The call exceeded its timeout."""


class BadRequestError(SoftserveError):  # 400 (and 413/415/422 via subclasses or directly)
    pass


class AuthenticationError(SoftserveError):  # 401
    pass


class PermissionDeniedError(SoftserveError):  # 403
    pass


class NotFoundError(SoftserveError):  # 404
    pass


class ConflictError(SoftserveError):  # 409
    pass


class PayloadTooLargeError(BadRequestError):  # 413
    pass


class UnprocessableEntityError(BadRequestError):  # 422
    pass


class RateLimitError(SoftserveError):  # 429
    pass


class InternalServerError(SoftserveError):  # 5xx other than 503
    pass


class ServiceUnavailableError(SoftserveError):  # 503
    pass


_CLASS_BY_STATUS: dict[int, type[SoftserveError]] = {
    400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
    409: ConflictError, 413: PayloadTooLargeError, 415: BadRequestError, 422: UnprocessableEntityError,
    429: RateLimitError, 503: ServiceUnavailableError,
}
# Errors inside an SSE stream carry no status; the OpenAI `type` names it (see softserve/api/errors.py).
_STATUS_BY_TYPE = {
    "invalid_request_error": 400, "authentication_error": 401, "permission_error": 403, "not_found_error": 404,
    "conflict_error": 409, "rate_limit_error": 429, "server_error": 500, "service_unavailable": 503,
}


def _error_class(status: int | None) -> type[SoftserveError]:
    if status is None:
        return SoftserveError
    if status in _CLASS_BY_STATUS:
        return _CLASS_BY_STATUS[status]
    if status >= 500:
        return InternalServerError
    return BadRequestError if status >= 400 else SoftserveError


def error_from_body(body: Any, status: int | None, headers: Mapping[str, str] | None = None,
                    request_id: str | None = None, fallback: str = "") -> SoftserveError:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message") or fallback or "error")
        etype, code, param = err.get("type"), err.get("code"), err.get("param")
    else:
        message, etype, code, param = (str(err) if err else fallback or "error"), None, None, None
    if status is None and etype in _STATUS_BY_TYPE:
        status = _STATUS_BY_TYPE[etype]
    return _error_class(status)(message, status_code=status, code=code, param=param, type=etype, body=body,
                                headers=headers, request_id=request_id)


def error_from_response(resp: httpx.Response, request_id: str | None) -> SoftserveError:
    try:
        body = resp.json()
    except ValueError:
        body = None
    fallback = resp.text[:500] if body is None else ""
    return error_from_body(body, resp.status_code, resp.headers, request_id, fallback or resp.reason_phrase)


def connection_error(exc: Exception, request_id: str | None) -> APIConnectionError:
    cls = APITimeoutError if isinstance(exc, httpx.TimeoutException) else APIConnectionError
    return cls(f"{type(exc).__name__}: {exc}", request_id=request_id)
