"""Device-resident LRU of prompt tensors, keyed by content sha256 (never by name).

Keying by content means two names (or tenants) with identical bytes share one device copy, and
a new version of a name can never be served from a stale entry. Entries in use by in-flight
requests are pinned (refcount > 0) and never evicted; `budget_bytes` is a hard limit, counting
entries that are still loading.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator
from contextlib import contextmanager

import torch

from .compose import load_composed_tensor
from .types import LoadedPrompt, PromptCacheFull, PromptIntegrityError, PromptMeta

__all__ = ["PromptCache", "CacheStats"]


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    bytes: int  # includes entries being loaded (their space is reserved up front)
    entries: int
    pinned: int
    budget_bytes: int


@dataclass
class _Entry:
    nbytes: int
    refcount: int = 0
    tensor: torch.Tensor | None = None
    error: BaseException | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    discard_on_release: bool = False


class PromptCache:
    def __init__(self, store, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, budget_bytes: int) -> None:
        self.store = store
        self.device = torch.device(device)
        self.dtype = dtype
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # LRU order: oldest first
        self._lock = threading.Lock()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    def _nbytes(self, meta: PromptMeta) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return meta.num_virtual_tokens * meta.token_dim * itemsize

    def _make_room(self, need: int) -> None:
        """Evict LRU unpinned entries until `need` fits. Caller holds the lock. Evicts nothing
        if it cannot succeed, so a failing request does not flush useful entries."""
        if need > self.budget_bytes:
            raise PromptCacheFull(f"prompt needs {need} bytes, more than the whole cache budget ({self.budget_bytes})")
        free = self.budget_bytes - self._bytes
        if free >= need:
            return
        evictable = sum(e.nbytes for e in self._entries.values() if e.refcount == 0)
        if free + evictable < need:
            raise PromptCacheFull("prompt cache is full: all cached prompts are in use; retry shortly")
        for sha in list(self._entries):
            if self.budget_bytes - self._bytes >= need:
                break
            e = self._entries[sha]
            if e.refcount == 0:
                del self._entries[sha]
                self._bytes -= e.nbytes
                self._evictions += 1

    def acquire(self, meta: PromptMeta, parts: tuple[PromptMeta, ...] = ()) -> LoadedPrompt:
        """Return the prompt on the cache device, pinned until `release`. Loads on first use;
        concurrent first uses of the same sha wait for one load.

        With `parts`, `meta` is a composition (compose.compose_meta) and the entry holds the parts'
        concatenation under the composition's own sha."""
        sha = meta.sha256
        with self._lock:
            entry = self._entries.get(sha)
            if entry is not None:
                entry.refcount += 1
                self._entries.move_to_end(sha)
                self._hits += 1
                loader = False
            else:
                need = self._nbytes(meta)
                self._make_room(need)
                entry = _Entry(nbytes=need, refcount=1)
                self._entries[sha] = entry
                self._bytes += need
                self._misses += 1
                loader = True

        if loader:
            try:
                t = load_composed_tensor(self.store, parts) if parts else self.store.load_tensor(meta)
                if tuple(t.shape) != (meta.num_virtual_tokens, meta.token_dim):
                    raise PromptIntegrityError(f"stored tensor for {meta.ref} has shape {tuple(t.shape)}")
                entry.tensor = t.to(device=self.device, dtype=self.dtype).contiguous().requires_grad_(False)
            except BaseException as exc:
                with self._lock:
                    if self._entries.get(sha) is entry:
                        del self._entries[sha]
                        self._bytes -= entry.nbytes
                    entry.error = exc
                    entry.refcount -= 1
                entry.ready.set()
                raise
            entry.ready.set()
        else:
            entry.ready.wait()
            if entry.error is not None:
                with self._lock:
                    entry.refcount -= 1
                raise entry.error
        assert entry.tensor is not None
        return LoadedPrompt(meta=meta, embeddings=entry.tensor)

    def release(self, meta_or_sha: PromptMeta | LoadedPrompt | str) -> None:
        sha = _sha_of(meta_or_sha)
        with self._lock:
            entry = self._entries.get(sha)
            if entry is None or entry.refcount <= 0:
                raise ValueError(f"release of prompt {sha[:12]} that is not acquired")
            entry.refcount -= 1
            if entry.refcount == 0 and entry.discard_on_release:
                del self._entries[sha]
                self._bytes -= entry.nbytes

    @contextmanager
    def lease(self, meta: PromptMeta, parts: tuple[PromptMeta, ...] = ()) -> Iterator[LoadedPrompt]:
        loaded = self.acquire(meta, parts)
        try:
            yield loaded
        finally:
            self.release(meta)

    def discard(self, meta_or_sha: PromptMeta | LoadedPrompt | str) -> None:
        """Drop an entry (e.g. after its prompt was deleted). Pinned entries stay until their
        last release, so in-flight requests keep the tensor they hold."""
        sha = _sha_of(meta_or_sha)
        with self._lock:
            entry = self._entries.get(sha)
            if entry is None:
                return
            if entry.refcount == 0:
                del self._entries[sha]
                self._bytes -= entry.nbytes
            else:
                entry.discard_on_release = True

    def trim(self) -> int:
        """Evict every unpinned entry (after a device out-of-memory). Returns bytes freed."""
        with self._lock:
            freed = 0
            for sha in [s for s, e in self._entries.items() if e.refcount == 0 and e.tensor is not None]:
                freed += self._entries.pop(sha).nbytes
                self._evictions += 1
            self._bytes -= freed
            return freed

    def __contains__(self, meta_or_sha: object) -> bool:
        with self._lock:
            e = self._entries.get(_sha_of(meta_or_sha))  # type: ignore[arg-type]
            return e is not None and e.tensor is not None

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
                bytes=self._bytes,
                entries=len(self._entries),
                pinned=sum(1 for e in self._entries.values() if e.refcount > 0),
                budget_bytes=self.budget_bytes,
            )


def _sha_of(x: PromptMeta | LoadedPrompt | str) -> str:
    if isinstance(x, LoadedPrompt):
        return x.meta.sha256
    if isinstance(x, PromptMeta):
        return x.sha256
    return str(x)
