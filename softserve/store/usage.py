"""Per-tenant storage usage and quotas (see LAYOUT.md, "Quotas").

One small record per tenant, `tenants/<t>/usage.json` = {"prompts", "prompt_bytes", "file_bytes"},
kept up to date by every upload and delete with compare-and-swap (like heads), so a quota check is one
read however many prompts the tenant has. What counts:

- `prompts`: live prompt names (a head exists), `<name>-ckpt` names of tuning jobs included;
- `prompt_bytes`: the tensor bytes (num_virtual_tokens x token_dim x dtype size) of every live version
  of every name, so a blob shared by content with another name or tenant counts for each that lists it;
- `file_bytes`: uploaded training files (`POST /v1/files`), as uploaded.

Tuning jobs' own copies of their data, events and checkpoint state are not counted (their number is
bounded by the per-tenant job limits). A record that is missing (a store written before quotas) is
rebuilt by walking the tenant once; the garbage collector recomputes every record and repairs drift
(an upload killed between its head write and its usage update).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from . import cas, keys
from .backends import StorageBackend
from .types import PromptMeta, PromptQuotaExceeded, StorageQuotaExceeded

__all__ = ["Usage", "UsageLedger", "compute_usage", "head_metas"]



@dataclass(frozen=True)
class Usage:
    prompts: int = 0
    prompt_bytes: int = 0
    file_bytes: int = 0

    @property
    def bytes(self) -> int:
        return self.prompt_bytes + self.file_bytes

    def plus(self, prompts: int = 0, prompt_bytes: int = 0, file_bytes: int = 0) -> "Usage":
        return Usage(max(0, self.prompts + prompts), max(0, self.prompt_bytes + prompt_bytes),
                     max(0, self.file_bytes + file_bytes))

    def to_json(self) -> bytes:
        return json.dumps({"prompts": self.prompts, "prompt_bytes": self.prompt_bytes, "file_bytes": self.file_bytes,
                           "updated_at": int(time.time())}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> "Usage":
        d = json.loads(raw)
        return cls(int(d.get("prompts", 0)), int(d.get("prompt_bytes", 0)), int(d.get("file_bytes", 0)))


def head_metas(backend: StorageBackend, tenant: str, name: str, head: dict) -> list[PromptMeta]:
    """The metadata of every live version a head lists (the latest is inline; the others are read from
    their manifests; a listed version whose manifest is missing is skipped)."""
    latest = PromptMeta.from_dict(head["latest"])
    out = [latest]
    for version in head.get("versions", []):
        if version == latest.version:
            continue
        try:
            out.append(PromptMeta.from_dict(json.loads(backend.get(keys.prompt_version(tenant, name, version)))))
        except KeyError:
            continue
    return out


def compute_usage(backend: StorageBackend, tenant: str) -> Usage:
    """The tenant's usage from the store itself: a walk over its heads, their manifests and its files."""
    prompts = prompt_bytes = file_bytes = 0
    for key in backend.list(keys.prompts_prefix(tenant)):
        parsed = keys.parse_tenant_key(key)
        if parsed is None or parsed.kind != "head":
            continue
        try:
            head = json.loads(backend.get(key))
        except KeyError:
            continue
        prompts += 1
        prompt_bytes += sum(m.nbytes for m in head_metas(backend, tenant, parsed.name, head))
    for key in backend.list(keys.files_prefix(tenant)):
        parsed = keys.parse_tenant_key(key)
        if parsed is None or parsed.kind != "file_meta":
            continue
        try:
            file_bytes += int(json.loads(backend.get(key)).get("bytes", 0))
        except KeyError:
            continue
    return Usage(prompts, prompt_bytes, file_bytes)


class UsageLedger:
    """Reads, checks and updates the per-tenant usage records. Limits of 0 are unlimited (the records
    are kept all the same, so turning a quota on later needs no rebuild)."""

    def __init__(self, backend: StorageBackend, *, max_prompts: int = 0, max_bytes: int = 0) -> None:
        self.backend = backend
        self.max_prompts = int(max_prompts)
        self.max_bytes = int(max_bytes)
        self._cas = cas.has_compare_and_swap(backend)

    def read(self, tenant: str) -> tuple[Usage | None, str | None]:
        """(record, etag); (None, None) when the tenant has no record yet."""
        try:
            raw, etag = cas.read(self.backend, keys.usage(tenant), self._cas)
        except KeyError:
            return None, None
        return Usage.from_json(raw), etag

    def get(self, tenant: str) -> Usage:
        """The tenant's usage; a missing record is rebuilt from the store (once) and written."""
        usage, _ = self.read(tenant)
        if usage is not None:
            return usage
        usage = compute_usage(self.backend, tenant)
        if not self.backend.put(keys.usage(tenant), usage.to_json(), if_absent=True):
            usage = self.read(tenant)[0] or usage  # another writer created it meanwhile
        return usage

    def check(self, tenant: str, *, new_prompts: int = 0, new_bytes: int = 0) -> None:
        """Raise PromptQuotaExceeded (429) / StorageQuotaExceeded (413) if adding this would pass a limit."""
        if not ((self.max_prompts and new_prompts > 0) or (self.max_bytes and new_bytes > 0)):
            return
        usage = self.get(tenant)
        if self.max_prompts and new_prompts > 0 and usage.prompts + new_prompts > self.max_prompts:
            raise PromptQuotaExceeded(
                f"tenant {tenant!r} has {usage.prompts} prompts, the limit (--max-prompts-per-tenant) is "
                f"{self.max_prompts}: delete a prompt first", limit=self.max_prompts, usage=usage.prompts)
        if self.max_bytes and new_bytes > 0 and usage.bytes + new_bytes > self.max_bytes:
            raise StorageQuotaExceeded(
                f"tenant {tenant!r} stores {usage.bytes} bytes; {new_bytes} more would pass the limit "
                f"(--max-store-bytes-per-tenant) of {self.max_bytes} bytes: delete prompts or files first",
                limit=self.max_bytes, usage=usage.bytes)

    def add(self, tenant: str, *, prompts: int = 0, prompt_bytes: int = 0, file_bytes: int = 0) -> None:
        """Apply a change that is already in the store (after its head/file write), by compare-and-swap."""
        if not (prompts or prompt_bytes or file_bytes):
            return
        key = keys.usage(tenant)
        for attempt in range(cas.ATTEMPTS):
            usage, etag = self.read(tenant)
            if usage is None:
                # No record yet: the walk already sees the change being recorded.
                if self.backend.put(key, compute_usage(self.backend, tenant).to_json(), if_absent=True):
                    return
                continue
            if cas.swap(self.backend, key, usage.plus(prompts, prompt_bytes, file_bytes).to_json(), etag, self._cas):
                return
            cas.backoff(attempt)  # (a fixed sleep made 16 concurrent uploaders collide until they gave up)
        raise cas.conflict(f"usage record of tenant {tenant!r}")

    def repair(self, tenant: str, computed: Usage, etag: str | None, *, existed: bool) -> bool:
        """Write `computed` unless the record changed since it was read with `etag` (a write landed
        during the walk: leave it, the next run repairs). True if the record was rewritten."""
        key = keys.usage(tenant)
        if not existed:
            return self.backend.put(key, computed.to_json(), if_absent=True)
        if not self._cas:
            self.backend.put(key, computed.to_json())
            return True
        return bool(self.backend.put_if_match(key, computed.to_json(), etag))  # type: ignore[attr-defined]
