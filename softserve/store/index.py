"""The per-tenant listing index: what `PromptStore.list` reads instead of every head (see LAYOUT.md,
"Listing index").

`tenants/<t>/index/<NN>.json` (NN = 00..31, the shard of a name is a hash of it) maps each live name of
the tenant to a small listing record (its latest version's metadata without `adapter_config`);
`tenants/<t>/index/manifest.json` says the index is complete. Heads stay the source of truth:

- after every head write or delete the writer re-reads the name's head and puts what it finds into the
  shard, by compare-and-swap (read shard, read head, put-if-match; retried), so the last update of a
  shard always reflects the newest head of each of its names, whoever wrote it;
- a tenant without a manifest (a store written before the index, or one whose index was damaged) is
  listed by one walk over its heads, which also builds the index;
- a writer killed between its head write and its shard update leaves that one entry stale until the
  garbage collector compares every shard with the heads and repairs it (`softserve store gc`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import cas, keys
from .backends import StorageBackend
from .types import PromptMeta, PromptStoreError

__all__ = ["ListingIndex", "SHARDS", "shard_of", "listing_record", "meta_from_record"]

log = logging.getLogger("softserve.store.index")

SHARDS = 32  # on-disk format: a manifest with another count is rebuilt
FORMAT = 1
_READ_THREADS = 8  # shards are read concurrently: 32 sequential round trips would dominate on S3
_RECORD_FIELDS = ("version", "sha256", "num_virtual_tokens", "token_dim", "dtype", "peft_type", "created_at",
                  "description")


_pool: ThreadPoolExecutor | None = None  # shared by every index of the process
_pool_lock = threading.Lock()


def shard_of(name: str) -> int:
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "big") % SHARDS


def listing_record(meta: PromptMeta) -> dict[str, Any]:
    """What a listing shows of a name: its latest version's metadata without the adapter_config."""
    return {f: getattr(meta, f) for f in _RECORD_FIELDS}


def meta_from_record(tenant: str, name: str, record: dict[str, Any]) -> PromptMeta:
    # Positional, without from_dict's conversions: this runs once per listed name (10,000 per listing).
    r = record
    return PromptMeta(tenant, name, r["version"], r["sha256"], r["num_virtual_tokens"], r["token_dim"], r["dtype"],
                      r["peft_type"], r["created_at"], r.get("description"))


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


class ListingIndex:
    """Reads, updates, builds and repairs the listing index of every tenant of one backend."""

    def __init__(self, backend: StorageBackend) -> None:
        self.backend = backend
        self._cas = cas.has_compare_and_swap(backend)
        # Names whose shard update failed in this process (tenant -> names): retried before this process
        # lists the tenant again, and until they succeed its listings walk the heads instead.
        self._pending: dict[str, set[str]] = {}
        self._pending_lock = threading.Lock()

    # ---- backend access ----------------------------------------------------------------------------
    def _read(self, key: str) -> tuple[dict | None, str | None]:
        """(document, etag), (None, None) when absent; etag is None without compare-and-swap."""
        try:
            raw, etag = cas.read(self.backend, key, self._cas)
        except KeyError:
            return None, None
        return json.loads(raw), etag

    def _read_plain(self, key: str) -> dict | None:
        """A document without its etag (listing: no swap follows, and a LocalBackend etag hashes the file)."""
        try:
            return json.loads(self.backend.get(key))
        except KeyError:
            return None

    def _write(self, key: str, doc: dict, etag: str | None, *, existed: bool) -> bool:
        """Put `doc` iff the key is unchanged since it was read with `etag` (absent if not `existed`)."""
        data = _dumps(doc)
        if not existed and not self._cas:
            return self.backend.put(key, data, if_absent=True)
        return cas.swap(self.backend, key, data, etag if existed else None, self._cas)  # else last writer wins

    def _latest(self, tenant: str, name: str) -> PromptMeta | None:
        """The name's latest version, read from its head (never cached); None if it has no head."""
        try:
            head = json.loads(self.backend.get(keys.prompt_head(tenant, name)))
        except KeyError:
            return None
        return PromptMeta.from_dict(head["latest"])

    @staticmethod
    def _map(fn, items):
        """fn over items on the shared reader threads (fn must not call _map: no nesting, no deadlock)."""
        global _pool
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="softserve-index")
        return list(_pool.map(fn, items))

    def head_names(self, tenant: str) -> list[str]:
        """Every name with a head (one prefix listing, no reads)."""
        out = []
        for key in self.backend.list(keys.prompts_prefix(tenant)):
            parsed = keys.parse_tenant_key(key)
            if parsed is not None and parsed.kind == "head":
                out.append(parsed.name)
        return out

    # ---- listing -----------------------------------------------------------------------------------
    def walk(self, tenant: str) -> list[PromptMeta]:
        """The listing from the heads themselves (what `list` did before the index), sorted by name."""
        metas = [m for m in self._map(lambda n: self._latest(tenant, n), self.head_names(tenant)) if m is not None]
        return sorted(metas, key=lambda m: m.name)

    def read_shards(self, tenant: str) -> list[dict] | None:
        """Every shard's entries, or None when the index is not complete (no manifest, another shard
        count, a shard missing)."""
        manifest, _ = self._read(keys.index_manifest(tenant))
        if manifest is None or manifest.get("shards") != SHARDS:
            return None
        docs = self._map(lambda s: self._read_plain(keys.index_shard(tenant, s)), range(SHARDS))
        if any(d is None for d in docs):
            return None
        return [d.get("entries", {}) for d in docs]

    def list(self, tenant: str) -> list[PromptMeta]:
        """Latest version of every live name of a tenant (no adapter_config), sorted by name."""
        if not self._flush_pending(tenant):
            return self.walk(tenant)  # this process's own update is not in the index yet: never list stale
        shards = self.read_shards(tenant)
        if shards is None:
            try:
                return self.build(tenant)
            except PromptStoreError:  # the build kept losing compare-and-swaps: answer from the heads
                return self.walk(tenant)
        metas = [meta_from_record(tenant, name, rec) for entries in shards for name, rec in entries.items()]
        return sorted(metas, key=lambda m: m.name)

    # ---- updates -----------------------------------------------------------------------------------
    def updated(self, tenant: str, name: str) -> None:
        """Called after this process wrote or deleted the head of `name`. Never raises: a failed update
        is remembered and retried before this process lists the tenant (and repaired by the GC)."""
        try:
            ok = self._apply(tenant, name)
        except Exception:
            log.warning("listing index of tenant %s: update of %r failed; retried before the next listing",
                        tenant, name, exc_info=True)
            ok = False
        with self._pending_lock:
            names = self._pending.setdefault(tenant, set())
            if ok:
                names.discard(name)
            else:
                names.add(name)
            if not names:
                del self._pending[tenant]

    def _flush_pending(self, tenant: str) -> bool:
        with self._pending_lock:
            names = sorted(self._pending.get(tenant, ()))
        for name in names:
            self.updated(tenant, name)
        with self._pending_lock:
            return tenant not in self._pending

    def _apply(self, tenant: str, name: str) -> bool:
        """Put the name's current head into its shard: read the shard, then the head, then swap. Whoever
        swaps last read the head after every earlier swap, so the shard ends with the newest head."""
        key = keys.index_shard(tenant, shard_of(name))
        for attempt in range(cas.ATTEMPTS):
            doc, etag = self._read(key)
            if doc is None:
                return True  # no index (yet): the listing that builds it walks the heads, this one included
            latest = self._latest(tenant, name)
            entries = doc.setdefault("entries", {})
            record = None if latest is None else listing_record(latest)
            if entries.get(name) == record:
                return True
            if record is None:
                entries.pop(name, None)
            else:
                entries[name] = record
            if self._write(key, doc, etag, existed=True):
                return True
            cas.backoff(attempt)
        return False

    # ---- build and repair --------------------------------------------------------------------------
    def repair_shard(self, tenant: str, shard: int, names: set[str]) -> tuple[dict[str, dict], bool]:
        """Recompute one shard from the heads of `names` and of the names it lists (re-read now), and
        swap it in. Returns (entries, whether the stored shard changed)."""
        key = keys.index_shard(tenant, shard)
        for attempt in range(cas.ATTEMPTS):
            doc, etag = self._read(key)
            current = (doc or {}).get("entries", {})
            candidates = sorted(n for n in set(names) | set(current) if shard_of(n) == shard)
            latest = self._map(lambda n: self._latest(tenant, n), candidates)
            fresh = {m.name: listing_record(m) for m in latest if m is not None}
            if doc is not None and fresh == current and doc.get("shards") == SHARDS:
                return fresh, False
            new = {"format": FORMAT, "shards": SHARDS, "shard": shard, "entries": fresh}
            if self._write(key, new, etag, existed=doc is not None):
                return fresh, True
            cas.backoff(attempt)
        raise cas.conflict(f"listing index of tenant {tenant!r}")

    def build(self, tenant: str) -> list[PromptMeta]:
        """Build (or rebuild) a tenant's index from its heads; returns the listing it wrote. A tenant
        without prompts gets no index (nothing is written)."""
        if not self.head_names(tenant):
            return []
        # Every shard exists before the walk, so a writer either finds its shard and updates it, or its
        # head write came before the shard existed and therefore before the walk, which sees it.
        for shard in range(SHARDS):
            self.backend.put(keys.index_shard(tenant, shard),
                             _dumps({"format": FORMAT, "shards": SHARDS, "shard": shard, "entries": {}}), if_absent=True)
        by_shard: dict[int, set[str]] = {s: set() for s in range(SHARDS)}
        for name in self.head_names(tenant):
            by_shard[shard_of(name)].add(name)
        metas = []
        for shard in range(SHARDS):
            entries, _ = self.repair_shard(tenant, shard, by_shard[shard])
            metas += [meta_from_record(tenant, n, r) for n, r in entries.items()]
        self.backend.put(keys.index_manifest(tenant), _dumps({"format": FORMAT, "shards": SHARDS,
                                                              "built_at": int(time.time())}))
        log.info("listing index of tenant %s built: %d names", tenant, len(metas))
        return sorted(metas, key=lambda m: m.name)

    def check(self, tenant: str, latest: dict[str, PromptMeta], *, dry_run: bool = False) -> str | None:
        """The garbage collector's repair: compare the index with the heads it read (`latest`: name ->
        latest version) and fix what differs. Returns "built", "repaired" or None (nothing to do)."""
        manifest, _ = self._read(keys.index_manifest(tenant))
        if manifest is None or manifest.get("shards") != SHARDS:
            if not latest:
                return None
            if not dry_run:
                self.build(tenant)
            return "built"
        repaired = False
        for shard in range(SHARDS):
            doc, _ = self._read(keys.index_shard(tenant, shard))
            expected = {n: listing_record(m) for n, m in latest.items() if shard_of(n) == shard}
            if doc is not None and doc.get("entries", {}) == expected and doc.get("shards") == SHARDS:
                continue
            if dry_run:
                repaired = True
                continue
            # The heads may have changed since the GC read them: repair_shard re-reads them, and writes
            # only if the stored shard really differs from them.
            _, changed = self.repair_shard(tenant, shard, set(expected))
            repaired = repaired or changed
        return "repaired" if repaired else None
