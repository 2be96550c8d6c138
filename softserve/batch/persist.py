"""Batches in the store backend: the record, the input copy, result chunks and the run lease.

Keys (built by `softserve.store.keys`; see softserve/store/LAYOUT.md, "Batches"):

    batches/active/<batch_id>.json                          {"tenant": t} while a batch is not finished
    tenants/<t>/batches/<batch_id>/record.json              the batch (source of truth), updated by CAS
    tenants/<t>/batches/<batch_id>/input.jsonl              copy of the input file (deleted when finished)
    tenants/<t>/batches/<batch_id>/output/<first>-<run>.jsonl   output lines of input lines first.. (run `run`)
    tenants/<t>/batches/<batch_id>/error/<first>-<run>.jsonl    error lines of the same lines
    tenants/<t>/batches/<batch_id>/lease.json               {"owner", "expires_at"}: who runs it
    batches/finished/<t>/<batch_id>-<finished_at>.json      once finished: what the retention sweep lists

Progress is a prefix: `record["next_line"]` lines (in input order) have their results in the chunks the
record lists, `[first, end, run]` each. A runner writes a chunk object, then swaps in the record that
lists it, fenced by the record's `run` (a replica that lost the batch fails the swap). So a kill -9
loses at most the lines since the last swap, which the next run redoes; a chunk no record lists is
never read. Finished: the output and error files are written (`files/`), then the final record, then
the input copy and chunks are deleted and the batch leaves batches/active/. `retention_seconds` after
it finished, a sweep deletes the batch and its output and error files (`remove`), like tuning jobs.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from softserve.store import cas, keys
from softserve.batch.records import FINISHED
from softserve.store.finished_index import backfill_finished
from softserve.store.lease import HeldLease, LeaseKeeper, active_markers

__all__ = ["BatchStore", "RunLost", "HeldLease"]


class RunLost(RuntimeError):
    """Another run (on another replica, or after a restart) owns the batch now."""


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


class BatchStore:
    def __init__(self, backend, *, owner: str, lease_seconds: float) -> None:
        for op in ("get_with_etag", "put_if_match", "delete_if_match"):
            if not callable(getattr(backend, op, None)):
                raise TypeError(f"batches need a backend with compare-and-swap; {type(backend).__name__} has no {op}")
        self.backend = backend
        self.leases = LeaseKeeper(backend, owner=owner, lease_seconds=lease_seconds)

    @property
    def owner(self) -> str:
        return self.leases.owner

    # ---- records ------------------------------------------------------------------------------
    def create(self, record: dict[str, Any], input_text: str) -> None:
        tenant, batch_id = record["tenant"], record["id"]
        self.backend.put(keys.batch_input(tenant, batch_id), input_text.encode("utf-8"))
        if not self.backend.put(keys.batch_record(tenant, batch_id), _dumps(record), if_absent=True):
            raise RuntimeError(f"batch {batch_id} already exists")
        self.backend.put(keys.active_batch(batch_id), _dumps({"tenant": tenant}))

    def read(self, tenant: str, batch_id: str) -> dict[str, Any]:
        return json.loads(self.backend.get(keys.batch_record(tenant, batch_id)))

    def update(self, tenant: str, batch_id: str, change: Callable[[dict], dict | None]) -> dict[str, Any]:
        return cas.update_json(self.backend, keys.batch_record(tenant, batch_id), change, f"batch {batch_id}")

    def list(self, tenant: str) -> list[dict[str, Any]]:
        out = []
        for key in self.backend.list(keys.batches_prefix(tenant)):
            if key.endswith("/record.json"):
                try:
                    out.append(json.loads(self.backend.get(key)))
                except KeyError:
                    continue
        return sorted(out, key=lambda r: (r["created_at"], r["id"]), reverse=True)

    def active(self) -> list[tuple[str, str]]:
        return active_markers(self.backend, keys.ACTIVE_BATCHES_PREFIX, keys.active_batch_id)

    def read_input(self, tenant: str, batch_id: str) -> str:
        return self.backend.get(keys.batch_input(tenant, batch_id)).decode("utf-8")

    # ---- results ------------------------------------------------------------------------------
    def write_chunk(self, tenant: str, batch_id: str, first: int, run: int, output: str, errors: str) -> None:
        self.backend.put(keys.batch_chunk(tenant, batch_id, "output", first, run), output.encode("utf-8"))
        self.backend.put(keys.batch_chunk(tenant, batch_id, "error", first, run), errors.encode("utf-8"))

    def read_results(self, record: dict[str, Any], kind: str) -> str:
        """The committed lines of one kind ("output" or "error"), in input order."""
        tenant, batch_id = record["tenant"], record["id"]
        return "".join(self.backend.get(keys.batch_chunk(tenant, batch_id, kind, first, run)).decode("utf-8")
                       for first, _end, run in record["chunks"])

    def delete_work(self, tenant: str, batch_id: str) -> None:
        """The input copy and every chunk (a finished batch's results are in its files)."""
        self.backend.delete(keys.batch_input(tenant, batch_id))
        for kind in ("output", "error"):
            for key in self.backend.list(keys.batch_chunks_prefix(tenant, batch_id, kind)):
                self.backend.delete(key)

    def deactivate(self, batch_id: str) -> None:
        self.backend.delete(keys.active_batch(batch_id))

    # ---- finished batches: the index and retention ------------------------------------------------
    def mark_finished(self, tenant: str, batch_id: str, finished_at: float) -> None:
        self.backend.put(keys.finished_batch(tenant, batch_id, finished_at),
                         _dumps({"tenant": tenant, "batch_id": batch_id, "finished_at": int(finished_at)}))

    def finished(self) -> list[keys.FinishedBatchKey]:
        """Every finished batch in the index (tenant, id and finish time come from the key: no reads)."""
        return [p for p in map(keys.parse_finished_batch, self.backend.list(keys.FINISHED_BATCHES_PREFIX)) if p]

    def remove(self, entry: keys.FinishedBatchKey, files) -> None:
        """Delete a finished batch: its record first (from then on it is 404 and unlisted), then its
        output and error files (`files`: the FileRegistry, which gives their bytes back to the tenant's
        quota), the rest of its keys, and last its index entry, so a remove cut short is redone by the
        next sweep. Idempotent: several replicas may sweep at once. The uploaded input file is the
        tenant's and stays."""
        tenant, batch_id = entry.tenant, entry.batch_id
        try:
            record = self.read(tenant, batch_id)
        except KeyError:
            record = None
        if record is not None:
            if record.get("status") not in FINISHED:  # never ours to remove
                self.backend.delete(keys.finished_batch(tenant, batch_id, entry.finished_at))
                return
            self.backend.delete(keys.batch_record(tenant, batch_id))
            for file_id in (record.get("output_file_id"), record.get("error_file_id")):
                if file_id:
                    try:
                        files.delete(tenant, file_id)
                    except KeyError:
                        pass  # deleted by the tenant, or by a sweep cut short
        for key in self.backend.list(keys.batch_prefix(tenant, batch_id)):
            self.backend.delete(key)
        self.backend.delete(keys.finished_batch(tenant, batch_id, entry.finished_at))

    def index_legacy_finished(self) -> None:
        """Once per store: batches that finished before batches/finished/ existed get an entry there, so
        retention reaches them too (one walk of tenants/; idempotent)."""
        def index(tenant: str, batch_id: str, record: dict[str, Any]) -> None:
            finished_at = max(record.get(f) or 0 for f in ("completed_at", "failed_at", "cancelled_at", "expired_at"))
            self.mark_finished(tenant, batch_id, finished_at or record["created_at"])

        backfill_finished(self.backend, keys.FINISHED_BATCHES_INDEX_READY, "batch", keys.batch_record, FINISHED, index)

    # ---- lease ----------------------------------------------------------------------------------
    def acquire(self, tenant: str, batch_id: str) -> HeldLease | None:
        return self.leases.acquire(keys.batch_lease(tenant, batch_id))

    def lease_holder(self, tenant: str, batch_id: str) -> str | None:
        return self.leases.holder(keys.batch_lease(tenant, batch_id))
