"""Tuning jobs in the store backend: records, events, resume checkpoints and a run lease.

Every replica on one store (a directory or an S3 bucket) sees the same jobs. Keys (built by
`softserve.store.keys`; see softserve/store/LAYOUT.md, "Tuning jobs"):

    tuning/active/<job_id>.json                            marker while a job is not finished
    tenants/<t>/tuning/jobs/<job_id>/record.json           the job (source of truth), updated by CAS
    tenants/<t>/tuning/jobs/<job_id>/data/<train|validation>.jsonl   copy of the training data
    tenants/<t>/tuning/jobs/<job_id>/events/<first_seq>.jsonl        event chunks (record lists them)
    tenants/<t>/tuning/jobs/<job_id>/checkpoints/<step>.safetensors  trainer state to resume from
    tenants/<t>/tuning/jobs/<job_id>/lease.json            {"owner", "expires_at"}: who runs it
    tuning/finished/<t>/<job_id>-<finished_at>.json        a finished job whose resume state is gone

A finished job keeps no resume state: its checkpoints/ objects are deleted once the finished record is
written, then the job moves from tuning/active/ to tuning/finished/ (which the retention sweep lists).

Objects are written before the record that references them, so a crash leaves unreferenced
objects (ignored, overwritten on resume), never a record pointing at nothing. Nothing is pickled:
checkpoints are safetensors with JSON metadata.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import torch
from softserve.store import keys
from softserve.store.finished_index import backfill_finished
from softserve.store.lease import HeldLease, LeaseKeeper, active_markers
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from softserve.config import setting_default
from softserve.tuning.records import FINISHED

__all__ = ["JobStore", "Lease", "RecordConflict", "new_replica_id", "encode_state", "decode_state"]

_CAS_ATTEMPTS = 32


class RecordConflict(RuntimeError):
    """A compare-and-swap kept failing (another writer keeps changing the key)."""


def new_replica_id() -> str:
    return "replica-" + uuid.uuid4().hex[:12]


@dataclass
class Lease:
    tenant: str
    job_id: str
    owner: str
    etag: str
    expires_at: float


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode("utf-8")


def encode_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """Trainer state as safetensors bytes, the JSON metadata in the header (no pickle)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return st_save(tensors, metadata={"softserve.state": json.dumps(meta)})


def decode_state(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_len])
    return st_load(data), json.loads(header["__metadata__"]["softserve.state"])


class JobStore:
    def __init__(self, backend, *, owner: str, lease_seconds: float = setting_default("tuning_lease_seconds"), clock: Callable[[], float] = time.time) -> None:
        for op in ("get_with_etag", "put_if_match", "delete_if_match"):
            if not callable(getattr(backend, op, None)):
                raise TypeError(f"tuning jobs need a backend with compare-and-swap; {type(backend).__name__} has no {op}")
        self.backend = backend
        self.owner = owner
        self.lease_seconds = float(lease_seconds)
        self.clock = clock
        self.usage = None  # the store's UsageLedger: remove() gives a job's counted data bytes back

    # ---- keys ---------------------------------------------------------------------------------
    job_prefix = staticmethod(keys.job_prefix)

    # ---- records ------------------------------------------------------------------------------
    def create(self, record: dict[str, Any], data: dict[str, str]) -> None:
        tenant, job_id = record["tenant"], record["id"]
        for which, text in data.items():
            self.backend.put(keys.job_data(tenant, job_id, which), text.encode("utf-8"))
        if not self.backend.put(keys.job_record(tenant, job_id), _dumps(record), if_absent=True):
            raise RecordConflict(f"tuning job {job_id} already exists")
        self.backend.put(keys.active_job(job_id), _dumps({"tenant": tenant}))

    def read(self, tenant: str, job_id: str) -> dict[str, Any]:
        data, _ = self.backend.get_with_etag(keys.job_record(tenant, job_id))
        return json.loads(data)

    def update(self, tenant: str, job_id: str, change: Callable[[dict[str, Any]], dict[str, Any] | None]) -> dict[str, Any]:
        """Read-modify-write under compare-and-swap: `change(record)` returns the new record (or
        None: leave it). Re-read and redo on a conflict, so no writer loses another's fields."""
        key = keys.job_record(tenant, job_id)
        for _ in range(_CAS_ATTEMPTS):
            raw, etag = self.backend.get_with_etag(key)
            current = json.loads(raw)
            new = change(json.loads(raw))
            if new is None or new == current:
                return current
            if self.backend.put_if_match(key, _dumps(new), etag):
                return new
            time.sleep(0.01)
        raise RecordConflict(f"tuning job {job_id}: record kept changing under us")

    def list(self, tenant: str) -> list[dict[str, Any]]:
        out = []
        for key in self.backend.list(keys.jobs_prefix(tenant)):
            if key.endswith("/record.json"):
                try:
                    out.append(json.loads(self.backend.get(key)))
                except KeyError:  # deleted between list and get
                    continue
        return out

    def active(self) -> list[tuple[str, str]]:
        """(tenant, job_id) of every job not known to be finished."""
        return active_markers(self.backend, keys.ACTIVE_JOBS_PREFIX, keys.active_job_id)

    def deactivate(self, job_id: str) -> None:
        self.backend.delete(keys.active_job(job_id))

    def read_data(self, tenant: str, job_id: str, which: str) -> str | None:
        try:
            return self.backend.get(keys.job_data(tenant, job_id, which)).decode("utf-8")
        except KeyError:
            return None

    # ---- events -------------------------------------------------------------------------------
    def write_events(self, tenant: str, job_id: str, events: list[dict[str, Any]]) -> int:
        """One chunk object holding `events` (consecutive seqs); returns its first seq. The caller
        lists the chunk in the record afterwards."""
        first = events[0]["seq"]
        body = b"".join(_dumps(e) + b"\n" for e in events)
        self.backend.put(keys.job_events(tenant, job_id, first), body)
        return first

    def read_events(self, tenant: str, job_id: str, chunks: list[int], next_seq: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for first in chunks:
            try:
                raw = self.backend.get(keys.job_events(tenant, job_id, first))
            except KeyError:
                continue
            out.extend(json.loads(line) for line in raw.splitlines() if line.strip())
        # A chunk rewritten after a resume may hold seqs the record does not cover yet.
        return [e for e in out if e["seq"] < next_seq]

    # ---- checkpoints --------------------------------------------------------------------------
    def write_checkpoint(self, tenant: str, job_id: str, step: int, tensors: dict[str, torch.Tensor],
                         meta: dict[str, Any]) -> str:
        key = keys.job_checkpoint(tenant, job_id, step)
        self.backend.put(key, encode_state(tensors, meta))
        return key

    def read_checkpoint(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return decode_state(self.backend.get(key))

    # ---- finished jobs: resume state, the finished index, retention -----------------------------------
    def delete_resume_state(self, tenant: str, job_id: str) -> int:
        """Delete every checkpoints/ object of a job (only ever of a finished one); returns the bytes freed.
        The `<name>-ckpt` prompt versions the record lists are ordinary prompts and stay."""
        freed = 0
        for item in self.backend.list_with_mtime(keys.job_checkpoints_prefix(tenant, job_id)):
            self.backend.delete(item.key)
            freed += item.size
        return freed

    def mark_finished(self, tenant: str, job_id: str, finished_at: float) -> None:
        self.backend.put(keys.finished_job(tenant, job_id, finished_at),
                         _dumps({"tenant": tenant, "job_id": job_id, "finished_at": int(finished_at)}))

    def finished(self, tenant: str | None = None) -> list[keys.FinishedJobKey]:
        """Every finished job in the index, or one tenant's (tenant, id and finish time come from the
        key: no reads)."""
        out = []
        for key in self.backend.list(keys.FINISHED_JOBS_PREFIX + (f"{tenant}/" if tenant is not None else "")):
            parsed = keys.parse_finished_job(key)
            if parsed is not None:
                out.append(parsed)
        return out

    def remove(self, entry: keys.FinishedJobKey) -> int:
        """Delete a finished job entirely: the record first (from then on it is 404 and unlisted), then
        the rest of its keys, then its index entry, so a remove cut short is redone by the next sweep.
        Idempotent: several replicas may remove one job at once. Returns the bytes freed."""
        tenant, job_id = entry.tenant, entry.job_id
        try:
            record = json.loads(self.backend.get(keys.job_record(tenant, job_id)))
        except KeyError:
            record = None
        if record is not None and record.get("status") not in FINISHED:
            self.backend.delete(keys.finished_job(tenant, job_id, entry.finished_at))  # not ours to remove
            return 0
        freed = 0
        self.backend.delete(keys.job_record(tenant, job_id))
        for item in self.backend.list_with_mtime(keys.job_prefix(tenant, job_id)):
            self.backend.delete(item.key)
            freed += item.size
        counted = int(record.get("data_bytes") or 0) if record is not None else 0  # 0: a job from before F3
        if counted and self.usage is not None:
            # Two replicas removing one job at once may both give it back; the GC's usage repair
            # (store/usage.compute_usage counts job data) corrects that.
            self.usage.add(tenant, file_bytes=-counted)
        self.backend.delete(keys.active_job(job_id))
        self.backend.delete(keys.finished_job(tenant, job_id, entry.finished_at))
        return freed

    def remove_finished_before(self, cutoff: float) -> tuple[int, int]:
        """Remove every indexed job that finished before `cutoff`: (jobs removed, bytes freed)."""
        removed = freed = 0
        for entry in sorted(self.finished(), key=lambda e: e.finished_at):
            if entry.finished_at < cutoff:
                freed += self.remove(entry)
                removed += 1
        return removed, freed

    def remove_beyond(self, keep: int, tenant: str | None = None) -> tuple[int, int]:
        """Keep each tenant's (or one tenant's) `keep` most recently finished jobs, remove the older
        ones: (jobs removed, bytes freed). Ties in finish time (whole seconds) go by id."""
        by_tenant: dict[str, list[keys.FinishedJobKey]] = {}
        for entry in self.finished(tenant):
            by_tenant.setdefault(entry.tenant, []).append(entry)
        removed = freed = 0
        for entries in by_tenant.values():
            entries.sort(key=lambda e: (e.finished_at, e.job_id), reverse=True)
            for entry in entries[keep:]:
                freed += self.remove(entry)
                removed += 1
        return removed, freed

    def index_legacy_finished(self) -> bool:
        """Once per store: jobs that finished before tuning/finished/ existed get an entry there (and
        lose their resume state), so retention reaches them too; one walk of tenants/, then
        `FINISHED_INDEX_READY` says it is done. Idempotent (several replicas may do it at once)."""
        def index(tenant: str, job_id: str, record: dict[str, Any]) -> None:
            self.delete_resume_state(tenant, job_id)
            self.mark_finished(tenant, job_id, record.get("finished_at") or self.clock())

        backfill_finished(self.backend, keys.FINISHED_INDEX_READY, "job", keys.job_record, FINISHED, index)
        return True

    # ---- lease (softserve/store/lease.py) ---------------------------------------------------------
    def _leases(self) -> LeaseKeeper:
        return LeaseKeeper(self.backend, owner=self.owner, lease_seconds=self.lease_seconds, clock=self.clock)

    def acquire(self, tenant: str, job_id: str) -> Lease | None:
        """Take the job's lease if nobody holds a live one (or we already do). CAS: of two replicas
        racing for an expired lease exactly one wins."""
        held = self._leases().acquire(keys.job_lease(tenant, job_id))
        return None if held is None else Lease(tenant, job_id, held.owner, held.etag, held.expires_at)

    def renew(self, lease: Lease) -> bool:
        """Extend our lease; False if it is no longer ours (it expired and another replica took it)."""
        held = HeldLease(keys.job_lease(lease.tenant, lease.job_id), lease.owner, lease.etag, lease.expires_at)
        if not self._leases().renew(held):
            return False
        lease.etag, lease.expires_at = held.etag, held.expires_at
        return True

    def release(self, lease: Lease) -> None:
        self.backend.delete_if_match(keys.job_lease(lease.tenant, lease.job_id), lease.etag)

    def lease_holder(self, tenant: str, job_id: str) -> str | None:
        """Owner of a live lease, or None."""
        return self._leases().holder(keys.job_lease(tenant, job_id))
