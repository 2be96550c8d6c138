"""Admission from the request line and headers alone, before any body byte is read.

An unauthenticated client must not make the server buffer its body (a chunked upload is up to
--max-upload-bytes), and one tenant must not hold every upload slot: the gate answers 401 / 429 from
the headers, and the middleware calls it before it reads or forwards the body.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from softserve.service.auth import ApiKeyRegistry, Principal
from softserve.service.errors import Overloaded

from .deps import authenticate

# Paths that answer without a key: probes, the API description, the web console's page and assets
# (its /ui/api/* calls carry the key). /metrics guards itself (admin key).
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect",
                        "/ui", "/ui/"})
OPEN_PREFIXES = ("/ui/assets/",)


def is_upload(method: str, path: str) -> bool:
    """A prompt or file upload; an alias move (PUT /v1/prompts/{name}/aliases/{alias}) is a small JSON body."""
    prompt_upload = method == "PUT" and path.startswith("/v1/prompts/") and "/aliases/" not in path
    return prompt_upload or (method == "POST" and path.rstrip("/") == "/v1/files")


class UploadSlots:
    """Concurrent uploads in progress, in total and per tenant."""

    def __init__(self, total: int, per_tenant: int) -> None:
        self.total, self.per_tenant = total, per_tenant
        self._by_tenant: dict[str, int] = {}
        self._in_use = 0
        self._lock = threading.Lock()

    def acquire(self, tenant: str) -> Callable[[], None]:
        with self._lock:
            mine = self._by_tenant.get(tenant, 0)
            if mine >= self.per_tenant:
                raise Overloaded(f"too many concurrent uploads for this tenant ({self.per_tenant}, "
                               "--max-concurrent-uploads-per-tenant); retry when one has finished",
                               code="too_many_uploads", retry_after=1)
            if self._in_use >= self.total:
                raise Overloaded(f"the server is receiving {self.total} uploads already (--max-concurrent-uploads); "
                               "retry shortly", code="too_many_uploads", retry_after=1)
            self._by_tenant[tenant] = mine + 1
            self._in_use += 1
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                self._in_use -= 1
                left = self._by_tenant[tenant] - 1
                if left:
                    self._by_tenant[tenant] = left
                else:
                    del self._by_tenant[tenant]

        return release

    @property
    def in_use(self) -> int:
        return self._in_use


class AdmissionGate:
    def __init__(self, get_registry: Callable[[], ApiKeyRegistry], *, max_uploads: int, max_uploads_per_tenant: int,
                 rate_limiter=None) -> None:
        self.get_registry = get_registry
        self.uploads = UploadSlots(max_uploads, max_uploads_per_tenant)
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
