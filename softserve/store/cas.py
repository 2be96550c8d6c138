"""Compare-and-swap on one key: how every read-modify-write in the store is done (head manifests, usage
records, listing-index shards), so several processes on one backend never lose each other's updates.

Read the key with its etag, compute the new bytes, swap them in only if the etag is unchanged, and on a
conflict back off and redo. Backends without compare-and-swap (an S3 that ignores conditional headers)
get plain writes: last writer wins (LAYOUT.md says where that matters).
"""

from __future__ import annotations

import json
import random
import time

from .backends import ConditionalBackend, StorageBackend
from .types import PromptStoreError

__all__ = ["ATTEMPTS", "has_compare_and_swap", "read", "swap", "backoff", "conflict", "update_json"]

ATTEMPTS = 32  # read-modify-write rounds before giving up (409)


def has_compare_and_swap(backend: StorageBackend) -> bool:
    return isinstance(backend, ConditionalBackend) and bool(getattr(backend, "conditional_writes", True))


def read(backend: StorageBackend, key: str, cas: bool) -> tuple[bytes, str | None]:
    """(bytes, etag); the etag is None without compare-and-swap. KeyError if the key is missing."""
    if cas:
        return backend.get_with_etag(key)  # type: ignore[attr-defined]
    return backend.get(key), None


def swap(backend: StorageBackend, key: str, data: bytes, etag: str | None, cas: bool) -> bool:
    """Write iff the key still has `etag` (None: iff it is absent); without compare-and-swap, just write."""
    if cas:
        return bool(backend.put_if_match(key, data, etag))  # type: ignore[attr-defined]
    backend.put(key, data)
    return True


def backoff(attempt: int) -> None:
    """Jittered, growing: writers that collided must not retry in lock-step and collide again."""
    time.sleep(random.uniform(0.0, 0.01 * (attempt + 1)))


def conflict(what: str) -> PromptStoreError:
    return PromptStoreError(f"{what} kept changing concurrently; retry", status_code=409, code="conflict")


def update_json(backend: StorageBackend, key: str, change, what: str) -> dict:
    """Read-modify-write of one JSON object under compare-and-swap: `change(obj)` returns the new object
    (or None: leave it) and is redone on a conflict, so no writer loses another's fields. KeyError if
    the key is missing; what `change` raises propagates (a fence: "not ours any more")."""
    cas = has_compare_and_swap(backend)
    for attempt in range(ATTEMPTS):
        raw, etag = read(backend, key, cas)
        current = json.loads(raw)
        new = change(json.loads(raw))
        if new is None or new == current:
            return current
        if swap(backend, key, json.dumps(new, separators=(",", ":"), sort_keys=True).encode(), etag, cas):
            return new
        backoff(attempt)
    raise conflict(what)
