"""KV pool bookkeeping (plain Python): contiguous extents, first fit, coalescing on free."""

from __future__ import annotations

import random

import pytest

from softserve.engine.kv_allocator import KVAllocator


def test_first_fit_and_coalescing_restore_one_free_run():
    kv = KVAllocator(100)
    assert [kv.allocate(name, 30) for name in "abc"] == [0, 30, 60]
    assert kv.allocate("d", 11) is None and kv.free_tokens == 10  # 10 left, not enough
    kv.free("b")
    assert kv.largest_free() == 30 and kv.allocate("d", 20) == 30  # reuses b's hole
    kv.free("a")
    kv.free("c")
    kv.free("d")
    assert kv.free_tokens == 100 and kv.largest_free() == 100  # neighbours merged back into one run
    with pytest.raises(ValueError):
        kv.allocate("e", 0)


def test_random_churn_never_overlaps_and_never_leaks():
    rng = random.Random(7)
    kv = KVAllocator(1000)
    owned: dict[str, tuple[int, int]] = {}
    for step in range(3000):
        if owned and rng.random() < 0.45:
            name = rng.choice(sorted(owned))
            kv.free(name)
            del owned[name]
        else:
            length = rng.randint(1, 120)
            start = kv.allocate(f"r{step}", length)
            if start is not None:
                owned[f"r{step}"] = (start, length)
        spans = sorted(owned.values())
        assert all(a + la <= b for (a, la), (b, _) in zip(spans, spans[1:]))  # no two extents overlap
        assert all(0 <= a and a + la <= 1000 for a, la in spans)
        assert kv.used_tokens == sum(la for _, la in spans)
    for name in list(owned):
        kv.free(name)
    assert kv.largest_free() == 1000
