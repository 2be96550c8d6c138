"""Concurrent work in progress, in total and per tenant: one tenant must not hold every slot.

Used for uploads (softserve/api/admission.py) and grammar compiles (service/generation.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable

from softserve.service.errors import Overloaded


class TenantSlots:
    """acquire(tenant) -> release(), or Overloaded (429 `code`, Retry-After 1) when either count is full."""

    def __init__(self, total: int, per_tenant: int, *, noun: str, total_flag: str, tenant_flag: str, code: str) -> None:
        self.total, self.per_tenant = total, per_tenant
        self.noun, self.total_flag, self.tenant_flag, self.code = noun, total_flag, tenant_flag, code
        self._by_tenant: dict[str, int] = {}
        self._in_use = 0
        self._lock = threading.Lock()

    def acquire(self, tenant: str) -> Callable[[], None]:
        with self._lock:
            mine = self._by_tenant.get(tenant, 0)
            if mine >= self.per_tenant:
                raise Overloaded(f"too many concurrent {self.noun} for this tenant ({self.per_tenant}, "
                                 f"{self.tenant_flag}); retry when one has finished", code=self.code, retry_after=1)
            if self._in_use >= self.total:
                raise Overloaded(f"the server has {self.total} {self.noun} in progress already ({self.total_flag}); "
                                 "retry shortly", code=self.code, retry_after=1)
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
