"""A lease on one key: which replica runs a piece of work (a tuning job, a batch) right now.

The lease object is `{"owner", "expires_at"}`, written by compare-and-swap, so of two replicas racing
for a free or expired lease exactly one wins. The holder renews it (every third of its lifetime) and
deletes it when done; a replica that dies stops renewing and the lease expires, so another one takes
the work over. Replicas' clocks must agree to well under `lease_seconds`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Callable

__all__ = ["HeldLease", "LeaseKeeper", "active_markers"]


@dataclass
class HeldLease:
    key: str
    owner: str
    etag: str
    expires_at: float


def _body(owner: str, expires_at: float) -> bytes:
    return json.dumps({"expires_at": expires_at, "owner": owner}, separators=(",", ":"), sort_keys=True).encode()


class LeaseKeeper:
    """Leases of one owner (this replica) on a backend with compare-and-swap."""

    def __init__(self, backend, *, owner: str, lease_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.owner = owner
        self.lease_seconds = float(lease_seconds)
        self.clock = clock

    def acquire(self, key: str) -> HeldLease | None:
        """Take the lease if nobody holds a live one (or we already do)."""
        try:
            raw, etag = self.backend.get_with_etag(key)
            held = json.loads(raw)
            if held.get("owner") != self.owner and held.get("expires_at", 0) > self.clock():
                return None
        except KeyError:
            etag = None
        expires = self.clock() + self.lease_seconds
        if not self.backend.put_if_match(key, _body(self.owner, expires), etag):
            return None
        _, new_etag = self.backend.get_with_etag(key)
        return HeldLease(key, self.owner, new_etag, expires)

    def renew(self, lease: HeldLease) -> bool:
        """Extend our lease; False if it is no longer ours (it expired and another replica took it)."""
        expires = self.clock() + self.lease_seconds
        if not self.backend.put_if_match(lease.key, _body(self.owner, expires), lease.etag):
            return False
        try:
            _, lease.etag = self.backend.get_with_etag(lease.key)
        except KeyError:
            return False
        lease.expires_at = expires
        return True

    def release(self, lease: HeldLease) -> None:
        self.backend.delete_if_match(lease.key, lease.etag)

    def holder(self, key: str) -> str | None:
        """Owner of a live lease on `key`, or None."""
        try:
            held = json.loads(self.backend.get(key))
        except KeyError:
            return None
        return held.get("owner") if held.get("expires_at", 0) > self.clock() else None


def active_markers(backend, prefix: str, id_of: Callable[[str], str | None]) -> list[tuple[str, str]]:
    """(tenant, id) of every marker under `prefix` (a tuning job's or a batch's "not finished yet"),
    sorted by id. `id_of` parses a marker key (None: not a marker); a marker deleted between the list
    and the read, or unreadable, is skipped."""
    out = []
    for key in backend.list(prefix):
        work_id = id_of(key)
        if work_id is None:
            continue
        try:
            out.append((json.loads(backend.get(key))["tenant"], work_id))
        except (KeyError, ValueError):
            continue
    return sorted(out, key=lambda t: t[1])
