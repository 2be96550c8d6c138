"""The one place where errors become HTTP: status codes, headers and OpenAI-shaped bodies
{"error": {"message", "type", "param", "code"}}.

Code below the HTTP layer raises typed domain errors (`softserve.service.errors`); clients (the official
`openai` package maps status codes to exception classes) see one shape, and no stack trace leaks.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from softserve.store.types import PromptStoreError
from softserve.service.errors import (
    ClientGone, Conflict, InternalError, InvalidRequest, NotFound, NotReady, Overloaded, PermissionDenied,
    ServiceError, Timeout, TooLarge, Unauthenticated, Unprocessable, UnsupportedMediaType, from_store_error,
)

log = logging.getLogger("softserve.api")

STATUS_BY_ERROR: dict[type[ServiceError], int] = {
    InvalidRequest: 400, Unauthenticated: 401, PermissionDenied: 403, NotFound: 404, Conflict: 409, TooLarge: 413,
    UnsupportedMediaType: 415, Unprocessable: 422, Overloaded: 429,
    ClientGone: 499,  # "client closed request", as nginx logs it
    InternalError: 500, NotReady: 503, Timeout: 504,
}

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


def http_status(exc: ServiceError) -> int:
    for kind in type(exc).__mro__:
        if kind in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[kind]
    return 500


def http_headers(exc: ServiceError) -> dict[str, str]:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(exc.retry_after)))
    if isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    return headers


def error_body(status_code: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _TYPE_BY_STATUS.get(status_code, "invalid_request_error" if status_code < 500 else "server_error"),
            "param": param,
            "code": code,
        }
    }


def service_error_body(exc: ServiceError) -> dict:
    return error_body(http_status(exc), exc.message, param=exc.param, code=exc.code)


def service_error_response(exc: ServiceError) -> JSONResponse:
    return JSONResponse(service_error_body(exc), status_code=http_status(exc), headers=http_headers(exc))


async def send_service_error(send, exc: ServiceError) -> None:
    """The same answer from plain ASGI code (middleware), before any route runs."""
    body = json.dumps(service_error_body(exc)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in http_headers(exc).items()]
    await send({"type": "http.response.start", "status": http_status(exc), "headers": headers})
    await send({"type": "http.response.body", "body": body})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, exc: ServiceError) -> JSONResponse:
        return service_error_response(exc)

    @app.exception_handler(PromptStoreError)
    async def _store_error(_: Request, exc: PromptStoreError) -> JSONResponse:
        return service_error_response(from_store_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(400, "request body is not valid JSON", code="invalid_json"), status_code=400)
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        if param:
            message = f"{param}: {message}"
        return JSONResponse(error_body(400, message, param=param, code="invalid_parameter"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(ClientDisconnect)
    async def _client_disconnect(_: Request, exc: ClientDisconnect) -> JSONResponse:
        log.info("client disconnected before its request body was complete")
        return service_error_response(ClientGone("client closed the connection"))

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error: %s", exc)
        return JSONResponse(error_body(500, "internal server error"), status_code=500)
