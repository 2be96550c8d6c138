"""The once-per-store backfill of a finished-work index (tuning/finished/, batches/finished/).

Work that finished before its kind's finished index existed has no entry there, so retention would
never reach it. `backfill_finished` walks tenants/ once for the records of one kind, hands each
finished one to the caller (which writes its index entry), then writes the kind's "ready" key so no
replica walks again. Idempotent: several replicas may walk at once, and a crash mid-walk walks again.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Collection

from softserve.store import keys

__all__ = ["backfill_finished"]


def backfill_finished(backend, ready_key: str, kind: str, record_key: Callable[[str, str], str],
                      finished: Collection[str],
                      on_finished: Callable[[str, str, dict[str, Any]], None]) -> None:
    """Unless `ready_key` exists: call `on_finished(tenant, name, record)` for every record of `kind`
    ("job", "batch") under tenants/ (the key `record_key(tenant, name)`) whose status is in `finished`,
    then write `ready_key`. A record deleted between the list and the read, or unreadable, is skipped."""
    if backend.exists(ready_key):
        return
    for key in backend.list(keys.TENANTS_PREFIX):
        parsed = keys.parse_tenant_key(key)
        if parsed is None or parsed.kind != kind or parsed.name is None or key != record_key(parsed.tenant, parsed.name):
            continue
        try:
            record = json.loads(backend.get(key))
        except (KeyError, ValueError):
            continue
        if record.get("status") in finished:
            on_finished(parsed.tenant, parsed.name, record)
    backend.put(ready_key, json.dumps({"version": 1}, separators=(",", ":"), sort_keys=True).encode("utf-8"))
