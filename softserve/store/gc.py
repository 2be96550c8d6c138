"""Garbage collection of the store: unreferenced blobs, orphan version manifests, stale temp and lock
files; and a recount of every tenant's usage record. Safe to run while replicas serve and upload, from
any number of processes at once (see LAYOUT.md, "Garbage collection", for the argument).

    softserve store gc [--dry-run] [--grace-seconds N]      (or --store-gc-interval-seconds on a replica)
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

from . import keys
from .backends import StorageBackend
from .index import ListingIndex
from .types import PromptMeta
from .usage import Usage, UsageLedger, head_metas

__all__ = ["GCReport", "collect_garbage", "DEFAULT_GRACE_SECONDS"]

log = logging.getLogger("softserve.store.gc")

DEFAULT_GRACE_SECONDS = 3600.0


@dataclass
class GCReport:
    dry_run: bool
    grace_seconds: float
    blobs_deleted: int = 0
    blob_bytes_freed: int = 0
    blobs_referenced: int = 0
    blobs_young: int = 0  # unreferenced but younger than the grace period: kept (an upload may be writing its head)
    manifests_deleted: int = 0
    manifest_bytes_freed: int = 0
    temp_files_deleted: int = 0  # LocalBackend's `.tmp-*` and `.lock-*` leftovers
    temp_bytes_freed: int = 0
    usage_repaired: list[str] = field(default_factory=list)  # tenants whose usage record was corrected
    indexes_built: list[str] = field(default_factory=list)  # tenants whose listing index was missing
    indexes_repaired: list[str] = field(default_factory=list)  # tenants whose listing index disagreed with the heads
    seconds: float = 0.0

    @property
    def objects_deleted(self) -> int:
        return self.blobs_deleted + self.manifests_deleted + self.temp_files_deleted

    @property
    def bytes_freed(self) -> int:
        return self.blob_bytes_freed + self.manifest_bytes_freed + self.temp_bytes_freed

    def to_dict(self) -> dict:
        return {**asdict(self), "objects_deleted": self.objects_deleted, "bytes_freed": self.bytes_freed}


def collect_garbage(backend: StorageBackend, grace_seconds: float = DEFAULT_GRACE_SECONDS, *, dry_run: bool = False,
                    now: float | None = None) -> GCReport:
    """Mark every blob a live version references (every head of every tenant), then sweep what is
    neither referenced nor younger than `grace_seconds`. `now` (tests) replaces the clock."""
    started = time.monotonic()
    start = time.time() if now is None else now
    cutoff = start - float(grace_seconds)
    report = GCReport(dry_run=dry_run, grace_seconds=float(grace_seconds))
    ledger = UsageLedger(backend)

    # 0. What is under tenants/ (one listing), and every usage record before anything else is read: a
    #    record that changes during the walk is not "repaired" (its compare-and-swap fails).
    listed = backend.list_with_mtime(keys.TENANTS_PREFIX)
    heads, manifests, file_metas, tenants = [], [], [], set()
    for item in listed:
        parsed = keys.parse_tenant_key(item.key)
        if parsed is None:
            continue
        tenants.add(parsed.tenant)
        if parsed.kind == "head":
            heads.append(parsed)
        elif parsed.kind == "version":
            manifests.append((parsed, item))
        elif parsed.kind == "file_meta":
            file_metas.append(parsed)
    records = {t: ledger.read(t) for t in sorted(tenants)}

    # 1. Mark: every version listed in a head, with its blob.
    referenced: set[str] = set()
    live: set[tuple[str, str, str]] = set()
    counted = {t: Usage() for t in tenants}
    latest: dict[str, dict[str, PromptMeta]] = {t: {} for t in tenants}  # for the listing index check
    for h in heads:
        try:
            head = json.loads(backend.get(keys.prompt_head(h.tenant, h.name)))
        except KeyError:
            continue  # deleted meanwhile
        latest[h.tenant][h.name] = PromptMeta.from_dict(head["latest"])
        for v in head.get("versions", []):
            live.add((h.tenant, h.name, v))
        metas = head_metas(backend, h.tenant, h.name, head)
        referenced.update(m.sha256 for m in metas)
        counted[h.tenant] = counted[h.tenant].plus(1, sum(m.nbytes for m in metas))
    for f in file_metas:
        try:
            size = int(json.loads(backend.get(keys.file_meta(f.tenant, f.name))).get("bytes", 0))
        except KeyError:
            continue
        counted[f.tenant] = counted[f.tenant].plus(file_bytes=size)

    # 2. Sweep blobs, listed after the mark: an upload whose head the mark missed wrote (or, re-using
    #    an existing blob, rewrote) its blob less than a grace period ago.
    for item in backend.list_with_mtime(keys.BLOBS_PREFIX):
        sha = keys.blob_sha(item.key)
        if sha is None:
            continue
        if sha in referenced:
            report.blobs_referenced += 1
            continue
        fresh = backend.info(item.key) if item.mtime < cutoff else item  # re-check right before deleting
        if fresh is None:
            continue
        if fresh.mtime >= cutoff:
            report.blobs_young += 1
            continue
        if not dry_run:
            backend.delete(item.key)
        report.blobs_deleted += 1
        report.blob_bytes_freed += fresh.size

    # 3. Orphan version manifests: not listed in their name's head (crashed uploads, deleted names).
    for parsed, item in manifests:
        if (parsed.tenant, parsed.name, parsed.version) in live or item.mtime >= cutoff:
            continue
        try:  # re-read the head: an upload may have adopted this manifest since the mark
            head = json.loads(backend.get(keys.prompt_head(parsed.tenant, parsed.name)))
            if parsed.version in head.get("versions", []):
                continue
        except KeyError:
            pass
        key = keys.prompt_version(parsed.tenant, parsed.name, parsed.version)
        fresh = backend.info(key)
        if fresh is None or fresh.mtime >= cutoff:
            continue
        if not dry_run:
            backend.delete(key)
        report.manifests_deleted += 1
        report.manifest_bytes_freed += fresh.size

    # 4. Temp files of writers killed mid-write, lock files of keys that are gone (LocalBackend only).
    for sweep in ("stale_temp_files", "remove_stale_lock_files"):
        fn = getattr(backend, sweep, None)
        if callable(fn):
            n, size = fn(grace_seconds, now=start, dry_run=dry_run)
            report.temp_files_deleted += n
            report.temp_bytes_freed += size

    # 5. Usage records: rewrite those that disagree with the walk (unless they changed meanwhile).
    for tenant, (recorded, etag) in records.items():
        if recorded == counted[tenant] or (recorded is None and counted[tenant] == Usage()):
            continue
        if dry_run or ledger.repair(tenant, counted[tenant], etag, existed=recorded is not None):
            report.usage_repaired.append(tenant)
            if recorded is not None:
                log.info("usage of tenant %s was %s, recounted %s", tenant, recorded, counted[tenant])

    # 6. Listing indexes: build missing ones, repair shards that disagree with the heads (a writer killed
    #    between its head write and its index update). Shards are re-read and compared-and-swapped.
    index = ListingIndex(backend)
    for tenant in sorted(tenants):
        outcome = index.check(tenant, latest[tenant], dry_run=dry_run)
        if outcome == "built":
            report.indexes_built.append(tenant)
        elif outcome == "repaired":
            report.indexes_repaired.append(tenant)
            log.info("listing index of tenant %s disagreed with its heads: repaired", tenant)

    report.seconds = round(time.monotonic() - started, 3)
    log.info("store gc%s: %d objects, %d bytes freed (%d blobs, %d manifests, %d temp files); %d blobs referenced, "
             "%d young", " (dry run)" if dry_run else "", report.objects_deleted, report.bytes_freed, report.blobs_deleted,
             report.manifests_deleted, report.temp_files_deleted, report.blobs_referenced, report.blobs_young)
    return report


class PeriodicGC:
    """Runs `collect_garbage` every `interval_s` in a daemon thread (`--store-gc-interval-seconds`).
    Errors are logged and retried at the next interval; `on_report(report)` feeds the metrics."""

    def __init__(self, backend: StorageBackend, interval_s: float, grace_seconds: float, on_report=None) -> None:
        import threading

        self.backend, self.interval_s, self.grace_seconds, self.on_report = backend, float(interval_s), grace_seconds, on_report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="softserve-store-gc", daemon=True)

    def start(self) -> "PeriodicGC":
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                report = collect_garbage(self.backend, self.grace_seconds)
                if self.on_report is not None:
                    self.on_report(report)
            except Exception:
                log.exception("store gc failed; retrying in %.0f s", self.interval_s)

    def stop(self) -> None:
        self._stop.set()
