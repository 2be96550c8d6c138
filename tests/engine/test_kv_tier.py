"""The prompt-KV disk tier (softserve/engine/kv_tier.py): a new engine reads a prompt's KV from disk and
gives the same tokens as computing it; nothing is ever read back for other content, another model or
other numerics; bad files are misses, never failures; the byte budget holds across restarts."""

from __future__ import annotations

import copy
import os
import time

import torch

from softserve.engine.config import EngineConfig, SchedulerConfig
from softserve.engine.engine import LLMEngine
from softserve.engine.kv_tier import PrefixKVTier, engine_fingerprint, model_fingerprint
from tests.support.engine_utils import make_prompt, make_request, reference_greedy, run

HIDDEN = 64
IDS = list(range(40, 49))


def tier_engine(model, tokenizer, tier_dir, budget=1 << 30) -> LLMEngine:
    return LLMEngine(model, tokenizer, EngineConfig(scheduler=SchedulerConfig(), model_id="test",
                                                     kv_tier_dir=str(tier_dir), kv_tier_bytes=budget))


def virtual_rows_per_step(engine) -> list[int]:
    """Records how many virtual-token rows each step's forward computes."""
    seen: list[int] = []
    flatten = engine.runner._flatten

    def recording(rows):
        flat = flatten(rows)
        seen.append(len(flat.virtual_index))
        return flat

    engine.runner._flatten = recording
    return seen


def test_a_new_engine_reads_the_prompt_kv_from_disk_and_gives_the_same_tokens(tiny_model, tokenizer, tmp_path):
    prompt = make_prompt("p", 6, HIDDEN, 31)
    first = tier_engine(tiny_model, tokenizer, tmp_path)
    computed = virtual_rows_per_step(first)
    out1 = list(run(first, [make_request(IDS, soft_prompt=prompt, max_tokens=6, ignore_eos=True)]).values())[0]
    assert first.runner.kv_tier.flush(10)
    assert sum(computed) == 6 and first.stats().kv_tier.writes == 1

    second = tier_engine(tiny_model, tokenizer, tmp_path)  # empty device cache: only the disk has the KV
    read = virtual_rows_per_step(second)
    out2 = list(run(second, [make_request(IDS, soft_prompt=prompt, max_tokens=6, ignore_eos=True)]).values())[0]
    stats = second.stats()
    assert sum(read) == 0 and stats.kv_tier.hits == 1 and stats.prefix_cache_misses == 1
    assert out2 == out1 == reference_greedy(tiny_model, IDS, prompt, 6)
    batch = [make_request(IDS, soft_prompt=prompt, max_tokens=6, ignore_eos=True),
             make_request(IDS[:5], soft_prompt=make_prompt("q", 4, HIDDEN, 32), max_tokens=6, ignore_eos=True)]
    assert list(run(second, batch).values())[0] == out1  # batched beside a computed prompt: the same


def test_the_tier_serves_nothing_for_other_content_models_or_numerics(tiny_model, tokenizer, tmp_path):
    prompt = make_prompt("p", 5, HIDDEN, 41)
    engine = tier_engine(tiny_model, tokenizer, tmp_path)
    run(engine, [make_request(IDS, soft_prompt=prompt, max_tokens=1)])
    tier = engine.runner.kv_tier
    assert tier.flush(10) and prompt.ref.sha256 in tier
    r = engine.runner
    shape = (r.num_layers, 2, r.num_kv_heads, 5, r.head_dim)
    other = make_prompt("p", 5, HIDDEN, 42)  # same name and length, other content
    assert tier.get(other.ref.sha256, shape, torch.float32, "cpu") is None

    digest = model_fingerprint(tiny_model)
    changed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    assert model_fingerprint(changed) != digest
    from softserve.engine import native_kernels

    kwargs = dict(dtype=torch.float32, device_type="cpu", compiled=False, native_kernels=r.native_kernels, pack_linears=True,
                  kernels_digest=native_kernels.build_digest() if r.native_kernels else "")
    base = engine_fingerprint(digest, **kwargs)
    assert base == tier.fingerprint
    for change in (dict(dtype=torch.bfloat16), dict(compiled=True), dict(native_kernels=not r.native_kernels),
                   dict(device_type="cuda"), dict(pack_linears=False), dict(native_kernels=True, kernels_digest="other")):
        assert engine_fingerprint(digest, **{**kwargs, **change}) != base
    elsewhere = PrefixKVTier(tmp_path, engine_fingerprint(model_fingerprint(changed), **kwargs), 1 << 30)
    assert prompt.ref.sha256 not in elsewhere
    assert elsewhere.get(prompt.ref.sha256, shape, torch.float32, "cpu") is None


def test_a_bad_file_is_a_miss_and_is_replaced(tiny_model, tokenizer, tmp_path):
    prompt = make_prompt("p", 5, HIDDEN, 51)
    request = lambda: make_request(IDS, soft_prompt=prompt, max_tokens=4, ignore_eos=True)  # noqa: E731
    first = tier_engine(tiny_model, tokenizer, tmp_path)
    expected = list(run(first, [request()]).values())[0]
    assert first.runner.kv_tier.flush(10)
    path = first.runner.kv_tier._path(prompt.ref.sha256)
    path.write_bytes(path.read_bytes()[:100])  # truncated, e.g. by a full disk

    second = tier_engine(tiny_model, tokenizer, tmp_path)
    assert list(run(second, [request()]).values())[0] == expected
    stats = second.stats().kv_tier
    assert stats.errors == 1 and stats.hits == 0
    assert second.runner.kv_tier.flush(10) and second.stats().kv_tier.writes == 1  # computed again and rewritten
    third = tier_engine(tiny_model, tokenizer, tmp_path)
    assert list(run(third, [request()]).values())[0] == expected and third.stats().kv_tier.hits == 1


def test_a_file_of_another_shape_or_prompt_is_never_used(tmp_path):
    tier = PrefixKVTier(tmp_path, "f" * 64, 1 << 30)
    a, b = "a" * 64, "b" * 64
    kv = torch.randn(2, 2, 2, 5, 16)
    tier.put(a, kv)
    assert tier.flush(10)
    assert torch.equal(tier.get(a, (2, 2, 2, 5, 16), torch.float32, "cpu"), kv)
    assert tier.get(a, (2, 2, 2, 5, 16), torch.bfloat16, "cpu") is None  # the wrong dtype: dropped
    tier.put(a, kv)
    assert tier.flush(10)
    tier._path(a).rename(tier._path(b))  # a's file under b's name: its metadata says a
    tier._index[b] = tier._index.pop(a)
    assert tier.get(b, (2, 2, 2, 5, 16), torch.float32, "cpu") is None
    assert tier.flush(10)  # bad files are removed by the writer thread
    assert tier.stats().errors == 2 and not tier._path(b).exists()


def test_the_byte_budget_holds_across_restarts(tmp_path):
    kv = torch.randn(2, 2, 2, 8, 16)  # 4 KiB of data
    tier = PrefixKVTier(tmp_path, "f" * 64, 1 << 30)
    tier.put("0" * 64, kv)
    assert tier.flush(10)
    size = tier.bytes
    tier = PrefixKVTier(tmp_path, "f" * 64, 3 * size)
    for i in range(1, 6):
        tier.put(str(i) * 64, kv)
        assert tier.flush(10)
        assert tier.bytes <= 3 * size
        if i == 3:
            assert tier.get("1" * 64, tuple(kv.shape), kv.dtype, "cpu") is not None  # 1 is now the most recent
    assert tier.stats().files == 3 and tier.stats().evictions == 3
    kept = {p.stem[:1] for p in tier.directory.glob("*.safetensors")}
    assert kept == {"1", "4", "5"}  # least recently used went first
    old, live = tier.directory / ".killed.tmp", tier.directory / ".live.tmp"
    old.write_bytes(b"x")  # a writer killed mid-write, two hours ago
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    live.write_bytes(b"x")  # another server's write in progress
    again = PrefixKVTier(tmp_path, "f" * 64, 2 * size)  # a smaller budget at restart
    assert again.stats().files == 2 and again.bytes <= 2 * size
    assert not old.exists() and live.exists()


def test_two_servers_sharing_a_directory_read_each_others_files(tmp_path):
    writer = PrefixKVTier(tmp_path, "f" * 64, 1 << 30)
    reader = PrefixKVTier(tmp_path, "f" * 64, 1 << 30)  # started before the file existed
    kv = torch.randn(2, 2, 2, 5, 16)
    assert reader.get("a" * 64, tuple(kv.shape), kv.dtype, "cpu") is None
    writer.put("a" * 64, kv)
    assert writer.flush(10)
    assert torch.equal(reader.get("a" * 64, tuple(kv.shape), kv.dtype, "cpu"), kv)
    assert reader.stats().files == 1 and reader.stats().bytes == writer.stats().bytes


def test_staging_reads_the_disk_before_admission_so_the_step_does_not(tiny_model, tokenizer, tmp_path):
    prompt = make_prompt("p", 6, HIDDEN, 61)
    first = tier_engine(tiny_model, tokenizer, tmp_path)
    expected = list(run(first, [make_request(IDS, soft_prompt=prompt, max_tokens=4, ignore_eos=True)]).values())[0]
    assert first.runner.kv_tier.flush(10)
    second = tier_engine(tiny_model, tokenizer, tmp_path)
    runner = second.runner
    assert not runner.stage_prefix("0" * 64, 6)  # unknown: nothing read, nothing counted
    assert runner.stage_prefix(prompt.ref.sha256, 6) and runner.stage_prefix(prompt.ref.sha256, 6)
    tier_reads = second.stats().kv_tier.hits
    out = list(run(second, [make_request(IDS, soft_prompt=prompt, max_tokens=4, ignore_eos=True)]).values())[0]
    stats = second.stats()
    assert out == expected and tier_reads == 1 and stats.kv_tier.hits == 1 and stats.kv_tier.misses == 0
    assert stats.prefix_cache_hits == 1 and stats.prefix_cache_misses == 0


def test_a_disk_that_fails_reads_costs_a_miss_never_an_exception(tmp_path, monkeypatch):
    tier = PrefixKVTier(tmp_path, "f" * 64, 1 << 30)
    kv = torch.randn(2, 2, 2, 5, 16)
    tier.put("a" * 64, kv)
    assert tier.flush(10)
    import softserve.engine.kv_tier as kv_tier

    def failing_open(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(kv_tier, "safe_open", failing_open)
    assert tier.get("a" * 64, tuple(kv.shape), kv.dtype, "cpu") is None
    monkeypatch.setattr(type(tier), "_path", lambda self, sha: (_ for _ in ()).throw(PermissionError(13, "denied")))
    assert tier.get("b" * 64, tuple(kv.shape), kv.dtype, "cpu") is None  # even a failing stat
    stats = tier.stats()
    assert stats.errors == 2 and stats.misses == 2 and stats.hits == 0


def test_queued_writes_are_bounded_in_bytes(tmp_path, monkeypatch):
    import softserve.engine.kv_tier as kv_tier

    monkeypatch.setattr(kv_tier, "_MAX_QUEUED_BYTES", 3 * 4096)
    tier = PrefixKVTier(tmp_path, "f" * 64, 1 << 30)
    gate = __import__("threading").Event()
    original = tier._write
    monkeypatch.setattr(tier, "_write", lambda sha, kv: (gate.wait(10), original(sha, kv)))
    kv = torch.randn(4, 16, 16)  # 4 KiB
    for i in range(5):
        tier.put(str(i) * 64, kv)
    assert tier.stats().dropped == 2  # three fit the bound while the writer is stuck
    gate.set()
    assert tier.flush(10) and tier.stats().writes == 3 and tier._queued_bytes == 0
