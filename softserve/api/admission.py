"""Admission from the request line and headers alone, before any body byte is read.

An unauthenticated client must not make the server buffer its body (a chunked upload is up to
--max-upload-bytes), and one tenant must not hold every upload slot: the gate answers 401 / 429 from
the headers, and the middleware calls it before it reads or forwards the body.
"""

from __future__ import annotations

from collections.abc import Callable

from softserve.service.auth import ApiKeyRegistry, Principal
from softserve.service.slots import TenantSlots

from .deps import authenticate

# Paths that answer without a key: probes, the API description, the web console's page and assets
# (its /ui/api/* calls carry the key, but /ui/api/auth, which says whether one is needed). /metrics guards
# itself (admin key).
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect",
                        "/ui", "/ui/", "/ui/api/auth"})
OPEN_PREFIXES = ("/ui/assets/",)


def is_upload(method: str, path: str) -> bool:
    """A prompt or file upload; an alias move (PUT /v1/prompts/{name}/aliases/{alias}) is a small JSON body."""
    prompt_upload = method == "PUT" and path.startswith("/v1/prompts/") and "/aliases/" not in path
    return prompt_upload or (method == "POST" and path.rstrip("/") == "/v1/files")


def upload_slots(total: int, per_tenant: int) -> TenantSlots:
    """Concurrent uploads in progress, in total and per tenant."""
    return TenantSlots(total, per_tenant, noun="uploads", total_flag="--max-concurrent-uploads",
                       tenant_flag="--max-concurrent-uploads-per-tenant", code="too_many_uploads")


class AdmissionGate:
    def __init__(self, get_registry: Callable[[], ApiKeyRegistry], *, max_uploads: int, max_uploads_per_tenant: int,
                 rate_limiter=None) -> None:
        self.get_registry = get_registry
        self.uploads = upload_slots(max_uploads, max_uploads_per_tenant)
        self.rate_limiter = rate_limiter  # RateLimiter: requests per second per tenant

    def admit(self, scope, headers: dict[str, str]) -> Callable[[], None] | None:
        """Raises Unauthenticated or Overloaded; on success records the principal in the request state and
        returns the release callback of an upload slot (None when nothing is held)."""
        path = scope["path"]
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
            return None
        principal: Principal = authenticate(self.get_registry(), headers.get("authorization"))
        state = scope.setdefault("state", {})
        state["principal"] = principal
        state["tenant"] = principal.tenant
        if self.rate_limiter is not None:
            self.rate_limiter.check_request(principal.tenant)
        if is_upload(scope["method"], path):
            return self.uploads.acquire(principal.tenant)
        return None
