"""Versioned, tenant-scoped soft-prompt store on top of a StorageBackend. See LAYOUT.md.

Invariants:
- A version is immutable and named by its content hash; blobs are content-addressed and shared.
- The head manifest of a name is the only source of truth for what is live: it holds the latest
  version's metadata and the list of versions that belong to the name. It is written last, as one
  atomic put, so a crash never exposes a half-written version.
- Lookups read at most two keys (head, version manifest) and never list.
- Several processes (replicas) may share one backend: where the backend has compare-and-swap
  (`ConditionalBackend`: S3 `If-Match`, flock on a local directory), head updates are
  read-modify-write loops that never lose another writer's update. With `revalidate_seconds > 0`
  heads (and misses) are cached for that long, so a replica sees another's upload or delete within
  that window; its own writes are visible to itself at once. Blobs are content-addressed and never
  need revalidation.
"""

from __future__ import annotations

import builtins
import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import aliases as alias_records
from . import cas
from . import format as fmt
from . import keys
from .backends import StorageBackend
from .index import ListingIndex
from .names import NAME_RE, validate_name
from .types import ModelInfo, PromptIntegrityError, PromptMeta, PromptNotFound, PromptStoreError, PromptValidationError
from .usage import UsageLedger

__all__ = ["PromptStore", "validate_name", "NAME_RE"]

_VERSION_LEN = 12
_MIN_PREFIX = 6
_HEX = re.compile(r"^[0-9a-f]+$")
_HEAD_CACHE_ENTRIES = 10_000


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class _Head:
    latest: PromptMeta
    versions: tuple[str, ...]  # oldest first; the latest is moved to the end on re-upload
    # Release aliases live in the head (aliases.py): one compare-and-swap covers an alias move, an
    # upload and a delete, so no alias can ever point at a version its name does not have.
    aliases: dict[str, Any] = field(default_factory=dict, compare=False)  # alias -> record (aliases.Alias.to_dict)
    alias_log: dict[str, Any] = field(default_factory=dict, compare=False)  # {"seq", "last"}: see aliases.py

    def to_json(self) -> bytes:
        d: dict[str, Any] = {"latest": self.latest.to_dict(), "versions": list(self.versions), "updated_at": int(time.time())}
        if self.aliases:
            d["aliases"] = self.aliases
        if self.alias_log:
            d["alias_log"] = self.alias_log
        return _json(d)


class PromptStore:
    def __init__(
        self,
        backend: StorageBackend,
        model: ModelInfo,
        *,
        max_virtual_tokens: int = 256,
        max_upload_bytes: int = fmt.DEFAULT_MAX_BYTES,
        revalidate_seconds: float = 0.0,
        max_prompt_parts: int = 4,
        max_prompts_per_tenant: int = 0,
        max_store_bytes_per_tenant: int = 0,
    ) -> None:
        self.backend = backend
        self.model = model
        self.max_virtual_tokens = max_virtual_tokens  # per prompt, and per composition (sum of its parts)
        self.max_prompt_parts = max_prompt_parts  # parts of one composition ("a+b+c")
        self.max_upload_bytes = max_upload_bytes
        # One lock serialises the read-modify-write of head manifests within this process; across
        # processes the backend's compare-and-swap does (when it has one).
        self._lock = threading.RLock()
        self._cas = cas.has_compare_and_swap(backend)
        # name -> version resolution cache: head key -> (expires at, head or None). 0 = no cache.
        self.revalidate_seconds = float(revalidate_seconds)
        self._heads: OrderedDict[str, tuple[float, _Head | None]] = OrderedDict()
        self._versions_cache: OrderedDict[str, tuple[float, PromptMeta]] = OrderedDict()  # version key -> (expires at, meta)
        self._heads_lock = threading.Lock()
        self._writes = 0  # bumped by every local head write: a slower concurrent read must not cache an older head
        # Per-tenant usage records and quotas (0 = unlimited); see usage.py.
        self.usage = UsageLedger(backend, max_prompts=max_prompts_per_tenant, max_bytes=max_store_bytes_per_tenant)
        # Per-tenant listing index, updated after every head write (index.py; LAYOUT.md, "Listing index").
        self.index = ListingIndex(backend)

    # ---- keys -------------------------------------------------------------------------------
    # Built by softserve.store.keys (the one module that knows every keyspace; see LAYOUT.md).
    blob_key = staticmethod(keys.blob)
    _prompt_prefix = staticmethod(keys.prompts_prefix)
    _head_key = staticmethod(keys.prompt_head)
    _version_key = staticmethod(keys.prompt_version)

    # ---- reads ------------------------------------------------------------------------------
    @staticmethod
    def _parse_head(raw: bytes) -> _Head:
        d = json.loads(raw)
        return _Head(latest=PromptMeta.from_dict(d["latest"]), versions=tuple(d["versions"]),
                     aliases=d.get("aliases") or {}, alias_log=d.get("alias_log") or {})

    def _read_head_fresh(self, tenant: str, name: str) -> tuple[_Head | None, str | None]:
        """(head, etag) straight from the backend; etag is None without compare-and-swap."""
        try:
            raw, etag = cas.read(self.backend, self._head_key(tenant, name), self._cas)
        except KeyError:
            return None, None
        return self._parse_head(raw), etag

    def _read_head(self, tenant: str, name: str, *, fresh: bool = False) -> _Head | None:
        """The head, from the resolution cache while it is younger than revalidate_seconds
        (`fresh`: always from the backend, refreshing the cache)."""
        if self.revalidate_seconds <= 0:
            return self._read_head_fresh(tenant, name)[0]
        key = self._head_key(tenant, name)
        now = time.monotonic()
        with self._heads_lock:
            hit = self._heads.get(key)
            if hit is not None and hit[0] > now and not fresh:
                return hit[1]
            writes = self._writes
        head = self._read_head_fresh(tenant, name)[0]
        with self._heads_lock:
            if self._writes == writes:  # no local write raced this read
                self._remember(key, head, now)
        return head

    def _remember(self, key: str, head: _Head | None, now: float | None = None) -> None:
        """Caller holds _heads_lock."""
        if self.revalidate_seconds <= 0:
            return
        now = time.monotonic() if now is None else now
        self._heads[key] = (now + self.revalidate_seconds, head)
        self._heads.move_to_end(key)
        while len(self._heads) > _HEAD_CACHE_ENTRIES:
            self._heads.popitem(last=False)

    def _wrote_head(self, tenant: str, name: str, head: _Head | None) -> None:
        """This process changed a head: read-your-writes for this replica at once."""
        with self._heads_lock:
            self._writes += 1
            self._heads.pop(self._head_key(tenant, name), None)
            self._remember(self._head_key(tenant, name), head)

    def invalidate(self, tenant: str | None = None, name: str | None = None) -> None:
        """Forget cached resolutions (of one name, or all): the next lookup reads the backend."""
        with self._heads_lock:
            self._writes += 1
            if tenant is None or name is None:
                self._heads.clear()
            else:
                self._heads.pop(self._head_key(tenant, name), None)

    def _read_version(self, tenant: str, name: str, version: str) -> PromptMeta | None:
        try:
            raw = self.backend.get(self._version_key(tenant, name, version))
        except KeyError:
            return None
        return PromptMeta.from_dict(json.loads(raw))

    def _read_version_cached(self, tenant: str, name: str, version: str) -> PromptMeta | None:
        """A version manifest for serving (pinned references, aliases): cached like heads, for
        revalidate_seconds, so a canary's older arm does not cost a backend read per request. The head
        (membership) is checked by the caller on every call; manifests are write-once."""
        if self.revalidate_seconds <= 0:
            return self._read_version(tenant, name, version)
        key = self._version_key(tenant, name, version)
        now = time.monotonic()
        with self._heads_lock:
            hit = self._versions_cache.get(key)
            if hit is not None and hit[0] > now:
                return hit[1]
        meta = self._read_version(tenant, name, version)
        if meta is not None:
            with self._heads_lock:
                self._versions_cache[key] = (now + self.revalidate_seconds, meta)
                self._versions_cache.move_to_end(key)
                while len(self._versions_cache) > _HEAD_CACHE_ENTRIES:
                    self._versions_cache.popitem(last=False)
        return meta

    def resolve(self, tenant: str, name: str, version: str | None = None) -> PromptMeta:
        """Latest version, or a pinned one (full 12-char id or a unique prefix of >= 6 chars).

        Only keys under `tenant` are read, so another tenant's prompt is indistinguishable from a
        missing one."""
        validate_name(tenant, "tenant")
        validate_name(name)
        head = self._read_head(tenant, name)
        if head is None:
            raise PromptNotFound(f"prompt {name!r} not found")
        if version is None or version == head.latest.version:
            return head.latest
        v = version.lower()
        if len(v) < _MIN_PREFIX or not _HEX.match(v):
            raise PromptNotFound(f"version {version!r} of prompt {name!r} not found")
        matches = [x for x in head.versions if x.startswith(v)]
        if len(matches) != 1:
            # Membership in the head (not just the manifest existing) is what makes a version
            # live: manifests of deleted or half-written uploads stay invisible.
            raise PromptNotFound(f"version {version!r} of prompt {name!r} not found")
        meta = self._read_version_cached(tenant, name, matches[0])
        if meta is None:
            raise PromptNotFound(f"version {version!r} of prompt {name!r} not found")
        return meta

    def list(self, tenant: str) -> list[PromptMeta]:
        """Latest version of every live name of a tenant, sorted by name, from the listing index (no
        head is read; the metas carry no adapter_config: resolve a name for that). Reflects every
        put/delete this process completed, and other replicas' completed ones (see LAYOUT.md)."""
        validate_name(tenant, "tenant")
        return self.index.list(tenant)

    def versions(self, tenant: str, name: str) -> builtins.list[PromptMeta]:  # a bare `list` here would name the method list()
        """All live versions of a name, latest first. Always read from the backend (management
        calls, e.g. the API's delete, must not act on a cached view)."""
        validate_name(tenant, "tenant")
        validate_name(name)
        head = self._read_head(tenant, name, fresh=True)
        if head is None:
            raise PromptNotFound(f"prompt {name!r} not found")
        out = [head.latest]
        for v in reversed(head.versions):
            if v == head.latest.version:
                continue
            meta = self._read_version(tenant, name, v)
            if meta is not None:
                out.append(meta)
        return out

    def load_tensor(self, meta: PromptMeta) -> torch.Tensor:
        """CPU tensor in the stored dtype, verified against meta.sha256."""
        try:
            data = self.backend.get(self.blob_key(meta.sha256))
        except KeyError:
            raise PromptIntegrityError(f"blob for {meta.ref} is missing") from None
        try:
            tensor = fmt.decode_blob(data)
        except Exception as e:
            raise PromptIntegrityError(f"blob for {meta.ref} is unreadable: {e}") from None
        if fmt.content_sha256(tensor) != meta.sha256:
            raise PromptIntegrityError(f"blob for {meta.ref} does not match its sha256")
        return tensor

    def export_zip(self, meta: PromptMeta) -> bytes:
        return fmt.export_zip(meta, self.load_tensor(meta))

    def export_files(self, meta: PromptMeta) -> dict[str, bytes]:
        return fmt.export_adapter(meta, self.load_tensor(meta))

    # ---- writes -----------------------------------------------------------------------------
    def put(
        self,
        tenant: str,
        name: str,
        adapter_model: bytes,
        adapter_config: bytes | None,
        description: str | None = None,
    ) -> tuple[PromptMeta, builtins.list[str]]:
        """Store a new version and make it the latest. Returns (meta, warnings).

        Re-uploading a tensor the name already has returns that existing version unchanged (same
        id, created_at, description) and makes it the latest again: this is how to roll back."""
        validate_name(tenant, "tenant")
        validate_name(name)
        if name == self.model.name:  # `model: <that name>` means the base model: the prompt could never be used
            raise PromptStoreError(f"{name!r} is the served base model's name and cannot name a prompt",
                                   status_code=409, code="name_reserved")
        if description is not None and len(description) > 1024:
            raise PromptValidationError("description is longer than 1024 characters")
        parsed = fmt.parse_upload(
            adapter_model,
            adapter_config,
            self.model,
            max_virtual_tokens=self.max_virtual_tokens,
            max_bytes=self.max_upload_bytes,
        )
        sha = fmt.content_sha256(parsed.tensor)
        version = fmt.version_id(sha, parsed.adapter_config)[:_VERSION_LEN]
        with self._lock:
            blob_written = blob_reused = False
            for attempt in range(cas.ATTEMPTS):
                head, etag = self._read_head_fresh(tenant, name)
                existing = self._same_version(tenant, name, head, version, sha, parsed.adapter_config)
                added = (0 if head is not None else 1, 0)  # (names, tensor bytes) this upload adds
                if existing is not None:
                    meta = existing
                    history = tuple(v for v in head.versions if v != existing.version) + (existing.version,)
                else:
                    meta = PromptMeta(
                        tenant=tenant,
                        name=name,
                        version=version,
                        sha256=sha,
                        num_virtual_tokens=int(parsed.tensor.shape[0]),
                        token_dim=int(parsed.tensor.shape[1]),
                        dtype=parsed.dtype_name,
                        peft_type=parsed.peft_type,
                        created_at=int(time.time()),
                        description=description,
                        adapter_config=parsed.adapter_config,
                    )
                    prior = tuple(v for v in head.versions if v != version) if head else ()
                    history = prior + (version,)
                    added = (added[0], meta.nbytes)
                    self.usage.check(tenant, new_prompts=added[0], new_bytes=added[1])  # before anything is written
                    # 1. blob (content-addressed: an existing one already holds these exact bytes)
                    if not blob_written:
                        blob = fmt.encode_blob(parsed.tensor)
                        if not self.backend.put(self.blob_key(sha), blob, if_absent=True):
                            # Re-used (maybe an old, unreferenced one the GC is about to collect): rewrite
                            # it so its mtime is fresh and the GC's grace period covers this upload.
                            self.backend.put(self.blob_key(sha), blob)
                            blob_reused = True
                        blob_written = True
                    # 2. version manifest (invisible until the head lists it)
                    meta, adopted = self._write_version(meta)
                # 3. head last: the single atomic switch to the new latest
                if head is not None:  # aliases point at versions, which an upload never removes: carried over
                    new_head = replace(head, latest=meta, versions=history)
                else:
                    new_head = _Head(latest=meta, versions=history)
                if cas.swap(self.backend, self._head_key(tenant, name), new_head.to_json(), etag, self._cas):
                    break
                cas.backoff(attempt)  # another replica changed the head since we read it: re-read and redo
            else:
                raise cas.conflict(f"prompt {name!r}")
            self._wrote_head(tenant, name, new_head)
            self.index.updated(tenant, name)
            if existing is None and (blob_reused or adopted):
                self._verify_after_commit(meta, blob)  # a fresh blob/manifest is younger than any GC's cutoff
            self.usage.add(tenant, prompts=added[0], prompt_bytes=added[1])
        return meta, parsed.warnings

    def _verify_after_commit(self, meta: PromptMeta, blob: bytes) -> None:
        """A garbage collector that listed the store before this head was written may have deleted
        the blob or manifest this upload re-used, between our finding it and our head write (see
        LAYOUT.md, "Garbage collection"): put back what is missing. Never cached (info is a HEAD)."""
        if self.backend.info(self.blob_key(meta.sha256)) is None:
            self.backend.put(self.blob_key(meta.sha256), blob, if_absent=True)
        if self.backend.info(self._version_key(meta.tenant, meta.name, meta.version)) is None:
            self.backend.put(self._version_key(meta.tenant, meta.name, meta.version), _json(meta.to_dict()), if_absent=True)

    def _same_version(self, tenant: str, name: str, head: _Head | None, version: str, sha: str,
                      adapter_config: dict) -> PromptMeta | None:
        """The live version of this name with this tensor and config, if any: under its id, or under
        the pre-v2 id `sha[:12]` (stored before version ids covered the config)."""
        if head is None:
            return None
        for candidate in (version, sha[:_VERSION_LEN]):
            if candidate not in head.versions:
                continue
            meta = self._read_version(tenant, name, candidate)
            if meta is not None and meta.sha256 == sha and meta.adapter_config == adapter_config:
                return meta
        return None

    def _write_version(self, meta: PromptMeta) -> tuple[PromptMeta, bool]:
        """Write a version manifest unless one exists; return the manifest that is stored, and whether
        one was there already (adopted: the caller re-checks it after its head write, see GC).

        Version manifests are immutable once written: when two replicas upload the same new tensor
        at once, both publish the first writer's metadata (created_at, description), so the inline
        `latest` of the head and the manifest never disagree."""
        key = self._version_key(meta.tenant, meta.name, meta.version)
        raw = _json(meta.to_dict())
        if not self._cas:
            self.backend.put(key, raw)
            return meta, True  # maybe over a leftover: check it after the head write
        if self.backend.put(key, raw, if_absent=True):
            return meta, False
        try:
            stored_raw = self.backend.get(key)
            stored = PromptMeta.from_dict(json.loads(stored_raw))
        except (KeyError, ValueError, TypeError):
            stored = None
        if stored is not None and stored.sha256 == meta.sha256:
            self.backend.put(key, stored_raw)  # adopted leftover: freshen its mtime for the GC's grace period
            return stored, True
        self.backend.put(key, raw)  # unreadable or foreign leftover: replace it
        return meta, True

    def delete(self, tenant: str, name: str) -> None:
        """Remove a name with all its versions from listing and resolution.

        Deleting the head is the atomic step; version manifests are cleaned up after (leftovers
        from a crash are harmless: a later upload under the same name starts a fresh history).
        Blobs are shared by content and are not garbage-collected here."""
        validate_name(tenant, "tenant")
        validate_name(name)
        with self._lock:
            for attempt in range(cas.ATTEMPTS):
                head, etag = self._read_head_fresh(tenant, name)
                if head is None:
                    self._wrote_head(tenant, name, None)
                    self.index.updated(tenant, name)  # drops an entry a crashed delete left behind
                    raise PromptNotFound(f"prompt {name!r} not found")
                if head.aliases:  # checked on the very head the conditional delete removes: never a dangling alias
                    raise alias_records.in_use(name, head.aliases)
                sizes = {head.latest.version: head.latest.nbytes}  # what the delete frees, for the usage record
                for v in head.versions:
                    if v not in sizes and (m := self._read_version(tenant, name, v)) is not None:
                        sizes[v] = m.nbytes
                if not self._cas:
                    self.backend.delete(self._head_key(tenant, name))
                    break
                # Conditional: an update that lands between our read and delete is not left
                # behind with its version manifests deleted under it; we re-read and delete it too.
                if self.backend.delete_if_match(self._head_key(tenant, name), etag):  # type: ignore[attr-defined]
                    break
                cas.backoff(attempt)
            else:
                raise cas.conflict(f"prompt {name!r}")
            self._wrote_head(tenant, name, None)
            self.index.updated(tenant, name)
            self.usage.add(tenant, prompts=-1, prompt_bytes=-sum(sizes.values()))
            for v in head.versions:
                self.backend.delete(self._version_key(tenant, name, v))
            alias_records.forget_history(self.backend, tenant, name)

    # ---- maintenance ------------------------------------------------------------------------
    def collect_garbage(self, grace_seconds: float, dry_run: bool = False):
        """Delete unreferenced blobs, orphan version manifests and stale temp files older than the grace
        period, and repair the per-tenant usage records. Returns a GCReport. See gc.py / LAYOUT.md."""
        from .gc import collect_garbage

        return collect_garbage(self.backend, grace_seconds, dry_run=dry_run)
