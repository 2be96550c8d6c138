"""The C++ attention (native_kernels.py) equals the per-row SDPA reference, reads only each row's own
extent of the pool, and a row's result does not depend on the rest of the batch: decode rows, and
prefill rows given one query at a time with its causal extent (AttentionPlan.native_tokens).

Head sizes 64, 128 and 256 take the AVX-512 path where the building CPU has it, others the portable
loops; query heads per KV head 1-7 cover every chunk of the kernel's up-to-4-heads register blocks.
"""

from __future__ import annotations

import pytest
import torch

from softserve.engine import native_kernels
from softserve.engine.kv_cache import KVPool
from softserve.engine import packed_attention
from softserve.engine.packed_attention import AttentionPlan, PackedRow, batched_attention, reference_attention

pytestmark = pytest.mark.skipif(not native_kernels.can_build(), reason="no C++ compiler or ninja: the engine uses the SDPA path")


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert native_kernels.load(), "the decode attention kernel did not build (see the log)"


def _decode_case(kv_lens, kv_heads, groups, head_dim, dtype, seed=0):
    """Decode rows (one query each) at scattered pool extents; every slot no row owns is NaN."""
    gen = torch.Generator().manual_seed(seed)
    rows, slot = [], 2
    for i, kv_len in enumerate(kv_lens):
        rows.append(PackedRow(q_start=i, q_len=1, kv_start=slot, kv_len=kv_len))
        slot += kv_len + 3
    pool = KVPool(num_layers=1, num_kv_heads=kv_heads, head_dim=head_dim, capacity=slot + 4, dtype=dtype, device="cpu")
    pool.storage.copy_(torch.randn(pool.storage.shape, generator=gen))
    owned = torch.zeros(pool.storage.shape[3], dtype=torch.bool)  # every slot, the scratch slot too
    for r in rows:
        owned[r.kv_start : r.kv_start + r.kv_len] = True
    pool.storage[:, :, :, ~owned] = float("nan")
    keys, values = pool.layer(0)
    queries = torch.randn(len(rows), kv_heads * groups, head_dim, generator=gen).to(dtype)
    return tuple(rows), queries, keys, values


def _native(rows, queries, keys, values, window, scale):
    starts = torch.tensor([r.kv_start for r in rows])
    lengths = torch.tensor([r.kv_len for r in rows])
    return native_kernels.decode_attention(queries, keys, values, starts, lengths, window, scale)


LENGTHS = [1, 7, 33, 100, 2, 64, 17]


@pytest.mark.parametrize("head_dim", [16, 64, 128, 256])
@pytest.mark.parametrize("groups", [1, 3, 4, 7])
@pytest.mark.parametrize("window", [None, 5])
def test_decode_attention_equals_the_reference_in_fp32(head_dim, groups, window):
    rows, queries, keys, values = _decode_case(LENGTHS, 2, groups, head_dim, torch.float32)
    scale = head_dim**-0.5
    expected = reference_attention(rows, queries, keys, values, window, scale)
    got = _native(rows, queries, keys, values, window, scale)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_decode_attention_in_half_precision_is_the_fp32_result_rounded(dtype, head_dim):
    rows, queries, keys, values = _decode_case(LENGTHS, 3, 3, head_dim, dtype)
    expected = reference_attention(rows, queries.float(), keys.float(), values.float(), None, 0.125)
    got = _native(rows, queries, keys, values, None, 0.125)
    assert got.dtype == dtype
    # the kernel computes in float32 from the stored values, so only the final rounding differs
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2)


def test_a_rows_result_does_not_depend_on_the_batch():
    rows, queries, keys, values = _decode_case(LENGTHS, 2, 3, 64, torch.bfloat16)
    together = _native(rows, queries, keys, values, None, 0.125)
    for i, row in enumerate(rows):
        alone = _native((PackedRow(0, 1, row.kv_start, row.kv_len),), queries[i : i + 1], keys, values, None, 0.125)
        assert torch.equal(alone[0], together[i])


PLAN_SHAPES = [[(1, 9), (1, 30), (1, 1), (1, 17)], [(1, 25), (6, 6), (1, 3), (9, 30), (1, 14)], [(4, 4), (1, 12)],
               [(1, 50), (1, 8), (16, 48)]]


def _plan_case(shapes, kv_heads, groups, head_dim, dtype=torch.float32, seed=1):
    """Rows (q_len, kv_len) in packed order at scattered extents; slots no row owns are NaN."""
    gen = torch.Generator().manual_seed(seed)
    rows, q, slot = [], 0, 1
    for q_len, kv_len in shapes:
        rows.append(PackedRow(q, q_len, slot, kv_len))
        q, slot = q + q_len, slot + kv_len + 2
    keys = torch.full((kv_heads, slot + 2, head_dim), float("nan"))
    values = torch.full((kv_heads, slot + 2, head_dim), float("nan"))
    for r in rows:
        keys[:, r.kv_start : r.kv_start + r.kv_len] = torch.randn(kv_heads, r.kv_len, head_dim, generator=gen)
        values[:, r.kv_start : r.kv_start + r.kv_len] = torch.randn(kv_heads, r.kv_len, head_dim, generator=gen)
    queries = torch.randn(q, kv_heads * groups, head_dim, generator=gen)
    return tuple(rows), queries.to(dtype), keys.to(dtype), values.to(dtype)


@pytest.mark.parametrize("shapes", PLAN_SHAPES)
@pytest.mark.parametrize("groups,head_dim", [(3, 64), (1, 64), (4, 128), (3, 16)])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("long_rows_by_sdpa", [False, True])
def test_plans_with_native_attention_equal_the_reference(shapes, groups, head_dim, window, long_rows_by_sdpa, monkeypatch):
    """Through AttentionPlan: decode and prefill rows in one kernel call per layer (prefill rows over
    NATIVE_PREFILL_MAX_KV by SDPA, here forced with a limit of 8), interleaved on the packed axis."""
    if long_rows_by_sdpa:
        monkeypatch.setattr(packed_attention, "NATIVE_PREFILL_MAX_KV", 8)
    rows, queries, keys, values = _plan_case(shapes, 2, groups, head_dim)
    plan = AttentionPlan.build(rows, "cpu", native_decode=True)
    assert plan.native_tokens is not None and plan.decode is None
    assert (plan.prefill is not None) == (long_rows_by_sdpa and any(r.q_len > 1 and r.kv_len > 8 for r in rows))
    scale = head_dim**-0.5
    expected = reference_attention(rows, queries, keys, values, window, scale)
    got = batched_attention(plan, queries, keys, values, window, scale)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("groups,head_dim", [(3, 64), (4, 128), (1, 256), (3, 16)])
def test_native_plans_in_half_precision_are_the_fp32_result_rounded(dtype, groups, head_dim):
    rows, queries, keys, values = _plan_case(PLAN_SHAPES[1] + [(20, 70)], 3, groups, head_dim, dtype)
    plan = AttentionPlan.build(rows, "cpu", native_decode=True)
    expected = reference_attention(rows, queries.float(), keys.float(), values.float(), None, 0.125)
    got = batched_attention(plan, queries, keys, values, None, 0.125)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_prefill_rows_result_does_not_depend_on_the_batch(dtype):
    """Bitwise: each row of a mixed step attended alone (its own plan) gives the same bits as in the batch."""
    rows, queries, keys, values = _plan_case(PLAN_SHAPES[1] + [(33, 100)], 3, 3, 64, dtype)
    together = batched_attention(AttentionPlan.build(rows, "cpu", True), queries, keys, values, None, 0.125)
    for row in rows:
        alone_row = (PackedRow(0, row.q_len, row.kv_start, row.kv_len),)
        q = queries[row.q_start : row.q_start + row.q_len]
        alone = batched_attention(AttentionPlan.build(alone_row, "cpu", True), q, keys, values, None, 0.125)
        assert torch.equal(alone, together[row.q_start : row.q_start + row.q_len])


def test_a_query_with_no_keys_is_left_as_zeros():
    rows, queries, keys, values = _decode_case([4, 6], 1, 3, 64, torch.bfloat16)
    got = native_kernels.decode_attention(queries, keys, values, torch.tensor([rows[0].kv_start, 0]),
                                          torch.tensor([4, 0]), None, 0.125)
    assert torch.equal(got[1], torch.zeros_like(got[1]))
    assert torch.equal(got[0], _native(rows[:1], queries[:1], keys, values, None, 0.125)[0])


def test_an_extent_outside_the_pool_is_refused():
    rows, queries, keys, values = _decode_case([4, 4], 1, 1, 64, torch.float32)
    with pytest.raises(RuntimeError, match="outside the pool"):
        native_kernels.decode_attention(queries, keys, values, torch.tensor([0, keys.shape[1] - 2]), torch.tensor([4, 4]),
                                          None, 0.125)


@pytest.mark.parametrize("prefill_limit", [packed_attention.NATIVE_PREFILL_MAX_KV, 4])
def test_engine_tokens_are_the_same_with_and_without_the_kernel(tiny_model, tokenizer, prefill_limit, monkeypatch):
    """Whole engine in fp32, mixed steps (chunked prefill, soft prompts, rows joining): kernel == gather + SDPA
    (with a prefill limit of 4, most prefill rows take SDPA beside the kernel's call)."""
    from tests.support.engine_utils import mixed_step_tokens

    monkeypatch.setattr(packed_attention, "NATIVE_PREFILL_MAX_KV", prefill_limit)

    outputs = {}
    for native in (True, False):
        def set_up(engine, native=native):
            assert engine.runner.native_kernels  # the engine turns the kernel on where it is built
            engine.runner.native_kernels = native

        outputs[native] = mixed_step_tokens(tiny_model, tokenizer, set_up)
    assert all(len(o) == 8 for o in outputs[True])
    assert outputs[True] == outputs[False]


# ---- RMSNorm ------------------------------------------------------------------------------------------
def test_the_rms_norm_classes_are_llamas_code():
    """The kernel is installed on these classes because their forward IS LlamaRMSNorm's: a transformers
    release that changes one of them must fail here, not serve a wrong norm."""
    import importlib
    import inspect

    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    llama = inspect.getsource(LlamaRMSNorm.forward)
    for name in native_kernels.RMS_NORM_CLASSES:
        family = name.removesuffix("RMSNorm").lower()
        module = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        assert inspect.getsource(getattr(module, name).forward) == llama, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 64), (1, 16, 576), (3, 7, 960)])
def test_rms_norm_equals_the_module(dtype, shape):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(2)
    norm = LlamaRMSNorm(shape[-1], eps=1e-5)
    norm.weight.data = (1 + 0.3 * torch.randn(shape[-1], generator=gen))
    norm = norm.to(dtype)
    x = (3 * torch.randn(shape, generator=gen)).to(dtype)
    with torch.inference_mode():
        expected = norm(x)
    got = native_kernels.rms_norm(x, norm.weight, norm.variance_epsilon)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    else:  # the sum of squares in another order: at most one rounding step of the dtype apart
        step = torch.finfo(dtype).eps * expected.float().abs().clamp_min(torch.finfo(dtype).tiny)
        assert bool(((got.float() - expected.float()).abs() <= 2 * step + 1e-6).all())
        assert (got != expected).float().mean() < 0.05


def test_rms_norms_are_installed_on_bf16_models_only(tiny_model):
    import copy

    assert native_kernels.install_rms_norms(tiny_model) == 0  # fp32: the modules' own code (PEFT parity)
    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    layers = model.config.num_hidden_layers
    assert native_kernels.install_rms_norms(model) == 2 * layers + 1
    assert native_kernels.install_rms_norms(model) == 2 * layers + 1  # idempotent
    norm = model.model.norm
    x = torch.randn(1, 5, model.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    with torch.enable_grad():  # autograd (tuning): the module's own forward, which has a gradient
        y = norm(x)
        y.sum().backward()
    assert x.grad is not None
    with torch.inference_mode():
        torch.testing.assert_close(norm(x.detach()), native_kernels.rms_norm(x.detach(), norm.weight, norm.variance_epsilon))


def test_bf16_engine_with_native_norms_batched_equals_solo(tiny_model, tokenizer):
    import copy

    from tests.support.engine_utils import make_engine, make_prompt, make_request, run

    model = copy.deepcopy(tiny_model).to(torch.bfloat16)
    hidden = model.config.hidden_size
    prompts = [make_prompt(f"q{i}", k, hidden, seed=i) for i, k in enumerate((4, 9))] + [None]
    inputs = [list(range(200 + 5 * i, 200 + 5 * i + n)) for i, n in enumerate((6, 19, 11, 4))]

    def requests():
        return [make_request(ids, soft_prompt=prompts[i % 3], max_tokens=6, ignore_eos=True) for i, ids in enumerate(inputs)]

    engine = make_engine(model, tokenizer, max_batch_size=4)
    assert getattr(model.model.norm, "_softserve_native_norm", False)
    batch = requests()
    done = run(engine, batch)
    together = [done[r.request_id] for r in batch]
    alone = []
    for request in requests():
        alone.append(run(make_engine(model, tokenizer, max_batch_size=4), [request])[request.request_id])
    assert together == alone


# ---- KV writes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_is_index_copy(dtype):
    gen = torch.Generator().manual_seed(3)
    pool = torch.randn(2, 3, 50, 64, generator=gen).to(dtype)  # [K/V, kv_heads, capacity, d]
    expected = pool.clone()
    new = torch.randn(2, 5, 3, 64, generator=gen).to(dtype).transpose(1, 2)  # [K/V, kv_heads, tokens, d], strided as HF's
    slots = torch.tensor([7, 8, 30, 2, 49])
    expected[0].index_copy_(1, slots, new[0])
    expected[1].index_copy_(1, slots, new[1])
    native_kernels.write_kv(pool[0], pool[1], new[0], new[1], slots)
    assert torch.equal(pool, expected)
    with pytest.raises(RuntimeError, match="outside the pool"):
        native_kernels.write_kv(pool[0], pool[1], new[0], new[1], torch.tensor([7, 8, 30, 2, 50]))
    assert torch.equal(pool, expected)  # a refused write writes nothing


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_strided_query_reads_the_same_as_a_contiguous_one(dtype):
    """attend_packed hands the kernel query[0].transpose(0, 1), a view: same bits as the contiguous copy."""
    rows, queries, keys, values = _plan_case(PLAN_SHAPES[1], 3, 3, 64, dtype)
    extents = packed_attention.token_extents(rows)
    assert extents is not None
    heads_first = queries.transpose(0, 1).contiguous()  # [q_heads, tokens, d], as the model hands it over
    strided = native_kernels.decode_attention(heads_first.transpose(0, 1), keys, values, *extents, None, 0.125)
    assert torch.equal(strided, native_kernels.decode_attention(queries, keys, values, *extents, None, 0.125))


# ---- the compiled graph's attention op in C++ (csrc/step_attention.cpp) -------------------------------
def _step_case(shapes, dtype, long_limit=None, monkeypatch=None, seed=5):
    """A 2-layer pool of random K/V, rows (q_len, kv_len) whose new tokens are the last q_len of their
    extent, and one layer's query/key/value as HF hands them to attention: [1, heads, tokens, d]."""
    if long_limit is not None:
        monkeypatch.setattr(packed_attention, "NATIVE_PREFILL_MAX_KV", long_limit)
    gen = torch.Generator().manual_seed(seed)
    kv_heads, groups, head_dim = 3, 3, 64
    rows, q, slot, slots = [], 0, 1, []
    for q_len, kv_len in shapes:
        rows.append(PackedRow(q, q_len, slot, kv_len))
        slots += range(slot + kv_len - q_len, slot + kv_len)
        q, slot = q + q_len, slot + kv_len + 2
    pool = KVPool(num_layers=2, num_kv_heads=kv_heads, head_dim=head_dim, capacity=slot + 2, dtype=dtype, device="cpu")
    pool.storage.copy_(torch.randn(pool.storage.shape, generator=gen))
    rows = tuple(rows)
    batch = packed_attention.PackedBatch(pool=pool, write_slots=torch.tensor(slots), rows=rows, native_writes=True,
                                         plan=AttentionPlan.build(rows, "cpu", native_decode=True))
    query = torch.randn(1, q, kv_heads * groups, head_dim, generator=gen).to(dtype).transpose(1, 2)
    key = torch.randn(1, q, kv_heads, head_dim, generator=gen).to(dtype).transpose(1, 2)
    value = torch.randn(1, q, kv_heads, head_dim, generator=gen).to(dtype).transpose(1, 2)
    return batch, query, key, value


def _python_op(batch, query, key, value, window, scale):
    """What the Python op computes for layer 1, on a copy of the pool: (output, pool storage after)."""
    pool = KVPool(num_layers=2, num_kv_heads=batch.pool.storage.shape[2], head_dim=batch.pool.storage.shape[4],
                  capacity=batch.pool.capacity, dtype=batch.pool.storage.dtype, device="cpu")
    pool.storage.copy_(batch.pool.storage)
    copy = packed_attention.PackedBatch(pool=pool, write_slots=batch.write_slots, rows=batch.rows, plan=batch.plan,
                                        native_writes=batch.native_writes)
    return packed_attention.attend_packed(copy, 1, query, key, value, window, scale), pool.storage


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("shapes", [PLAN_SHAPES[0], PLAN_SHAPES[1], PLAN_SHAPES[3]])
def test_step_attention_runs_a_native_step_as_the_python_op_does(dtype, window, shapes):
    """Handed the step (native_step_attention), the C++ op writes the same K/V into the pool and returns
    the same output as the Python op (attend_packed), bit for bit; after the step it hands layers back."""
    import softserve.engine.compiled_forward  # noqa: F401  (registers the Python op the C++ one falls back to)

    batch, query, key, value = _step_case(shapes, dtype)
    assert packed_attention.native_step(batch) is not None
    expected, expected_pool = _python_op(batch, query, key, value, window, 0.125)
    with packed_attention.native_step_attention(batch):
        assert torch.ops.softserve_native.step_attention_set()
        out = torch.ops.softserve_native.step_attention(query, key, value, 1, window or 0, 0.125)
    assert not torch.ops.softserve_native.step_attention_set()
    assert torch.equal(out, expected) and out.shape == (1, query.shape[2], query.shape[1], query.shape[3])
    assert torch.equal(batch.pool.storage, expected_pool)
    # nothing set now: the op is the Python op, which needs the step's batch in this thread
    with pytest.raises(RuntimeError, match="outside a compiled engine forward"):
        torch.ops.softserve_native.step_attention(query, key, value, 1, window or 0, 0.125)


def test_step_attention_leaves_other_steps_to_the_python_op(monkeypatch):
    """A step with a long prefill row (SDPA) is not handed over: the op passes it to the Python op, which
    reads the batch from the thread-local as before: the same result as attend_packed."""
    import softserve.engine.compiled_forward  # noqa: F401

    batch, query, key, value = _step_case(PLAN_SHAPES[3], torch.bfloat16, long_limit=8, monkeypatch=monkeypatch)
    assert batch.plan.prefill is not None and packed_attention.native_step(batch) is None
    expected, expected_pool = _python_op(batch, query, key, value, None, 0.125)
    with packed_attention.current_batch(batch), packed_attention.native_step_attention(batch):
        assert not torch.ops.softserve_native.step_attention_set()
        out = torch.ops.softserve_native.step_attention(query, key, value, 1, 0, 0.125)
    assert torch.equal(out, expected) and torch.equal(batch.pool.storage, expected_pool)


def test_a_step_set_in_one_thread_is_not_seen_in_another():
    import threading

    batch, *_ = _step_case(PLAN_SHAPES[0], torch.bfloat16)
    seen = []
    with packed_attention.native_step_attention(batch):
        thread = threading.Thread(target=lambda: seen.append(torch.ops.softserve_native.step_attention_set()))
        thread.start()
        thread.join()
        assert torch.ops.softserve_native.step_attention_set()
    assert seen == [False]
