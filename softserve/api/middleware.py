"""ASGI middleware: request ids, body size limits, per-request status metrics.

Pure ASGI (not BaseHTTPMiddleware) so streaming responses and disconnects pass straight through.
"""

from __future__ import annotations

from softserve.api.errors import http_status, send_service_error
from softserve.logs import request_id_from
from softserve.service.errors import ServiceError, TooLarge


class RequestContextMiddleware:
    """Sets `request.state.request_id` (from X-Request-ID or new), echoes it back, caps body size,
    and counts finished requests by endpoint and status."""

    def __init__(self, app, *, max_body_bytes: int, max_upload_bytes: int, metrics=None, gate=None) -> None:
        self.app = app
        self.gate = gate  # AdmissionGate: 401/429 from the headers, before any body byte is read
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes
        self.metrics = metrics

    def _limit_for(self, scope) -> int:
        if scope["method"] == "PUT" and scope["path"].startswith("/v1/prompts/") and "/aliases/" not in scope["path"]:
            return self.max_upload_bytes
        if scope["method"] == "POST" and scope["path"].startswith("/v1/files"):
            return self.max_upload_bytes
        return self.max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = request_id_from(headers.get("x-request-id"))
        scope.setdefault("state", {})["request_id"] = request_id
        status_holder = {"status": 500}

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status_holder["status"] = message["status"]
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", request_id.encode())]
            await send(message)

        release = None
        if self.gate is not None:
            try:
                release = self.gate.admit(scope, headers)
            except ServiceError as exc:
                await send_service_error(send_with_id, exc)
                self._count(scope, http_status(exc))
                return
        try:
            await self._forward(scope, receive, send_with_id, headers, status_holder)
        finally:
            if release is not None:
                release()

    async def _forward(self, scope, receive, send_with_id, headers, status_holder: dict) -> None:
        limit = self._limit_for(scope)
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._reject(send_with_id, f"request body is larger than {limit} bytes")
            self._count(scope, 413)
            return
        if declared is None and scope["method"] in ("POST", "PUT", "PATCH"):
            # No Content-Length (chunked): read up to the limit before the app sees anything.
            chunks, total = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":  # gone mid-body: the client's doing, not a 500
                    self._count(scope, 499)
                    return
                body = message.get("body", b"")
                total += len(body)
                if total > limit:
                    await self._reject(send_with_id, f"request body is larger than {limit} bytes")
                    self._count(scope, 413)
                    return
                chunks.append(body)
                if not message.get("more_body", False):
                    break
            replay = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            sent = False

            async def replay_receive():
                nonlocal sent
                if not sent:
                    sent = True
                    return replay
                return await receive()

            receive = replay_receive
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self._count(scope, status_holder["status"])

    def _count(self, scope, status: int) -> None:
        if self.metrics is None:
            return
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"
        tenant = scope.get("state", {}).get("tenant", "-")
        self.metrics.count_request(tenant, endpoint, status)

    @staticmethod
    async def _reject(send, message: str) -> None:
        await send_service_error(send, TooLarge(message, code="body_too_large"))
