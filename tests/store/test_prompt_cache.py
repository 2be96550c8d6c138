"""Device LRU cache: eviction order, hard budget, pinning, 503 when full, counters, sha keying."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from softserve.store.cache import PromptCache
from softserve.store.format import content_sha256
from softserve.store.types import PromptCacheFull, PromptMeta

H = 8
ROW = H * 4  # bytes per virtual token in float32


class FakeStore:
    def __init__(self, delay: float = 0.0) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.loads: list[str] = []
        self.delay = delay
        self.fail = False

    def add(self, name: str, k: int, seed: int, dtype=torch.float32) -> PromptMeta:
        t = torch.randn(k, H, generator=torch.Generator().manual_seed(seed)).to(dtype)
        sha = content_sha256(t)
        self.tensors[sha] = t
        return PromptMeta("acme", name, sha[:12], sha, k, H, str(t.dtype).removeprefix("torch."), "PROMPT_TUNING", 0, None, {})

    def load_tensor(self, meta: PromptMeta) -> torch.Tensor:
        self.loads.append(meta.name)
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise OSError("backend down")
        return self.tensors[meta.sha256]


def test_hit_miss_and_dtype():
    s = FakeStore()
    a = s.add("a", 2, 1, dtype=torch.bfloat16)
    c = PromptCache(s, device="cpu", dtype=torch.float32, budget_bytes=10 * ROW)
    lp = c.acquire(a)
    assert lp.meta is a and lp.embeddings.dtype == torch.float32 and lp.embeddings.device.type == "cpu"
    assert not lp.embeddings.requires_grad
    assert torch.equal(lp.embeddings, s.tensors[a.sha256].float())
    c.release(a)
    c.acquire(a)
    c.release(lp)
    st = c.stats()
    assert (st.hits, st.misses, st.entries, st.bytes, st.pinned) == (1, 1, 1, 2 * ROW, 0)
    assert s.loads == ["a"]


def test_lru_eviction_order_and_budget():
    s = FakeStore()
    metas = [s.add(n, 2, i) for i, n in enumerate("abcd")]
    c = PromptCache(s, device="cpu", dtype=torch.float32, budget_bytes=6 * ROW)  # room for 3
    for m in metas[:3]:
        c.acquire(m)
        c.release(m)
    c.acquire(metas[0])  # a is now most recent; b is LRU
    c.release(metas[0])
    c.acquire(metas[3])  # evicts b
    c.release(metas[3])
    assert metas[1] not in c and all(m in c for m in (metas[0], metas[2], metas[3]))
    st = c.stats()
    assert st.evictions == 1 and st.bytes == 6 * ROW <= st.budget_bytes
    c.acquire(metas[1])  # reload b: evicts c (LRU now)
    c.release(metas[1])
    assert metas[2] not in c and c.stats().evictions == 2


def test_budget_never_exceeded_with_mixed_sizes():
    s = FakeStore()
    c = PromptCache(s, device="cpu", dtype=torch.float32, budget_bytes=10 * ROW)
    for i in range(30):
        m = s.add(f"p{i}", 1 + (i * 7) % 5, i)
        c.acquire(m)
        assert c.stats().bytes <= 10 * ROW
        c.release(m)


def test_pinned_never_evicted_and_full_raises():
    s = FakeStore()
    a, b, d = s.add("a", 3, 1), s.add("b", 3, 2), s.add("d", 3, 3)
    c = PromptCache(s, device="cpu", dtype=torch.float32, budget_bytes=6 * ROW)
    la = c.acquire(a)
    c.acquire(b)
    with pytest.raises(PromptCacheFull) as ei:
        c.acquire(d)
    assert ei.value.status_code == 503
    assert a in c and b in c and c.stats().evictions == 0 and c.stats().bytes == 6 * ROW
    c.release(b)
    c.acquire(d)  # b unpinned now: evicted, a stays
    assert b not in c and a in c and torch.equal(la.embeddings, s.tensors[a.sha256])


def test_too_big_for_budget():
    s = FakeStore()
    c = PromptCache(s, device="cpu", dtype=torch.float32, budget_bytes=2 * ROW)
    with pytest.raises(PromptCacheFull):
        c.acquire(s.add("big", 3, 1))
    assert c.stats().bytes == 0 and s.loads == []


def test_failed_full_does_not_flush_unpinned():
    s = FakeStore()
    a, b, big = s.add("a", 2, 1), s.add("b", 2, 2), s.add("big", 5, 3)
    c = PromptCache(s, device="cpu", dtype=torch.float32, budget_bytes=6 * ROW)
    c.acquire(a)
    c.acquire(b)
    c.release(b)
    with pytest.raises(PromptCacheFull):
        c.acquire(big)  # 2 pinned + 5 > 6 even after evicting b
    assert b in c


def test_keyed_by_sha_shared_between_names():
    s = FakeStore()
    a = s.add("a", 2, 7)
    other = PromptMeta("beta", "other-name", a.version, a.sha256, 2, H, "float32", "PROMPT_TUNING", 0, None, {})
    c = PromptCache(s, device="cpu", dtype=torch.float32, budget_bytes=10 * ROW)
    l1 = c.acquire(a)
    l2 = c.acquire(other)
    assert l2.meta is other and l1.embeddings.data_ptr() == l2.embeddings.data_ptr()
    assert c.stats().entries == 1 and s.loads == ["a"]
    c.release(a)
    c.release(other.sha256)
    with pytest.raises(ValueError):
        c.release(a)


def test_concurrent_first_use_loads_once():
    s = FakeStore(delay=0.05)
    a = s.add("a", 2, 1)
    c = PromptCache(s, device="cpu", dtype=torch.float32, budget_bytes=10 * ROW)
    results = []

    def work():
        results.append(c.acquire(a))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and s.loads == ["a"]
    assert len({r.embeddings.data_ptr() for r in results}) == 1
    assert c.stats().pinned == 1
    for _ in range(8):
        c.release(a)
    assert c.stats().pinned == 0 and (c.stats().hits, c.stats().misses) == (7, 1)


def test_load_failure_frees_reservation():
    s = FakeStore()
    a = s.add("a", 2, 1)
    c = PromptCache(s, device="cpu", dtype=torch.float32, budget_bytes=10 * ROW)
    s.fail = True
    with pytest.raises(OSError):
        c.acquire(a)
    assert c.stats().bytes == 0 and c.stats().entries == 0
    s.fail = False
    with c.lease(a) as lp:
        assert lp.embeddings.shape == (2, H)
    assert c.stats().pinned == 0


def test_discard_waits_for_pins():
    s = FakeStore()
    a, b = s.add("a", 2, 1), s.add("b", 2, 2)
    c = PromptCache(s, device="cpu", dtype=torch.float32, budget_bytes=10 * ROW)
    held = c.acquire(a)
    c.acquire(b)
    c.release(b)
    c.discard(b)
    c.discard(a)
    assert b not in c and a in c  # in-flight request keeps its tensor
    assert torch.equal(held.embeddings, s.tensors[a.sha256])
    c.release(a)
    assert a not in c and c.stats().bytes == 0
