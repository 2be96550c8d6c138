"""Per-tenant rate limits: token buckets for requests per second and generation tokens per minute.

A bucket holds up to `capacity` units and refills at `rate` units per second. A request takes what
it costs, or is refused with 429 and a `Retry-After` that says when it would fit. Buckets live in
this process: with several replicas behind a router each replica limits on its own.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from softserve.service.errors import InvalidRequest, Overloaded

__all__ = ["TokenBucket", "RateLimiter"]

_MAX_TENANTS = 100_000  # buckets kept; idle full buckets are dropped first


class TokenBucket:
    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate, self.capacity = rate, capacity
        self.level, self.updated = capacity, now

    def take(self, cost: float, now: float) -> float:
        """Takes `cost` and returns 0, or takes nothing and returns the seconds until it would fit."""
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now
        if cost <= self.level:
            self.level -= cost
            return 0.0
        return (cost - self.level) / self.rate


class RateLimiter:
    def __init__(self, requests_per_second: float = 0.0, tokens_per_minute: int = 0, *,
                 clock: Callable[[], float] = time.monotonic, on_reject: Callable[[str], None] = lambda _reason: None) -> None:
        self.requests_per_second = requests_per_second
        self.tokens_per_minute = tokens_per_minute
        self.clock, self.on_reject = clock, on_reject
        self._requests: dict[str, TokenBucket] = {}
        self._tokens: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def _bucket(self, buckets: dict[str, TokenBucket], tenant: str, rate: float, capacity: float, now: float) -> TokenBucket:
        bucket = buckets.get(tenant)
        if bucket is None:
            if len(buckets) >= _MAX_TENANTS:
                buckets.clear()  # crude but bounded: forgetting buckets only ever lets requests through
            bucket = buckets[tenant] = TokenBucket(rate, capacity, now)
        return bucket

    def check_request(self, tenant: str) -> None:
        """One request of `tenant` (--rate-limit-rps; burst: one second's worth, at least 1)."""
        rps = self.requests_per_second
        if rps <= 0:
            return
        with self._lock:
            now = self.clock()
            wait = self._bucket(self._requests, tenant, rps, max(1.0, rps), now).take(1.0, now)
        if wait:
            self.on_reject("rate_limit_requests")
            raise Overloaded(f"rate limit: more than {rps:g} requests per second for this tenant (--rate-limit-rps)",
                           code="rate_limit_exceeded", retry_after=max(1, math.ceil(wait)))

    def charge_tokens(self, tenant: str, tokens: int) -> None:
        """Prompt tokens + max_tokens of a generation request (--rate-limit-tokens-per-minute; burst: one
        minute's worth). A request that could never fit is a 400, not a 429 to retry forever."""
        tpm = self.tokens_per_minute
        if tpm <= 0:
            return
        if tokens > tpm:
            raise InvalidRequest(f"this request may use {tokens} tokens (prompt + max_tokens), more than this tenant's "
                           f"{tpm} tokens per minute (--rate-limit-tokens-per-minute); lower max_tokens or split it",
                           param="max_tokens", code="request_too_large")
        with self._lock:
            now = self.clock()
            wait = self._bucket(self._tokens, tenant, tpm / 60.0, float(tpm), now).take(float(tokens), now)
        if wait:
            self.on_reject("rate_limit_tokens")
            raise Overloaded(f"rate limit: more than {tpm} tokens per minute for this tenant "
                           "(--rate-limit-tokens-per-minute)", code="rate_limit_exceeded",
                           retry_after=max(1, math.ceil(wait)))
