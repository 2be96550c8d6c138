"""The batched packed attention (one SDPA call per row group per layer) equals the per-row reference loop.

Random K/V in a pool, rows at scattered extents with different query and KV lengths, decode and
prefill rows interleaved on the packed axis, GQA and plain multi-head, with and without a sliding
window, on the SDPA path and on the C++ kernel's (native_kernels.py). The engine-level tests (test_engine_v2.py, test_parity_peft.py) then hold the whole engine,
which uses the batched path, token for token to PEFT and to solo runs.
"""

from __future__ import annotations

import pytest
import torch

from softserve.engine import native_kernels
from softserve.engine.kv_cache import KVPool
from softserve.engine.packed_attention import AttentionPlan, PackedRow, batched_attention, reference_attention

HEAD_DIM = 16


def _case(row_shapes: list[tuple[int, int]], kv_heads: int, groups: int, seed: int = 0):
    """row_shapes: (q_len, kv_len) per row, in packed order. Extents are scattered over the pool, with gaps."""
    gen = torch.Generator().manual_seed(seed)
    rows, q, slot = [], 0, 3
    for q_len, kv_len in row_shapes:
        rows.append(PackedRow(q_start=q, q_len=q_len, kv_start=slot, kv_len=kv_len))
        q += q_len
        slot += kv_len + 5  # a gap between extents: a wrong gather index reads garbage and fails the test
    pool = KVPool(num_layers=1, num_kv_heads=kv_heads, head_dim=HEAD_DIM, capacity=slot + 8, dtype=torch.float32, device="cpu")
    pool.storage.copy_(torch.randn(pool.storage.shape, generator=gen))
    gaps = torch.ones(pool.storage.shape[3], dtype=torch.bool)  # every slot, the scratch slot too
    for r in rows:
        gaps[r.kv_start : r.kv_start + r.kv_len] = False
    pool.storage[:, :, :, gaps] = float("nan")  # slots no row owns: reading one poisons the output
    keys, values = pool.layer(0)
    tokens_first = torch.randn(q, kv_heads * groups, HEAD_DIM, generator=gen)
    return tuple(rows), tokens_first, keys, values


CASES = {
    "decode rows of different lengths": [(1, 9), (1, 30), (1, 1), (1, 17)],
    "decode rows of one length (no mask)": [(1, 12), (1, 12), (1, 12)],
    "one decode row": [(1, 40)],
    "one prefill row after decode rows": [(1, 12), (1, 30), (8, 20)],
    "prefill rows of different lengths": [(7, 7), (3, 20), (12, 12)],
    "prefill and decode interleaved": [(1, 25), (6, 6), (1, 3), (9, 30), (1, 14), (2, 2)],
    "chunk of a long prompt after decode rows": [(1, 50), (1, 8), (16, 48)],
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("kv_heads,groups", [(2, 3), (4, 1)])
@pytest.mark.parametrize("sliding_window", [None, 5])
@pytest.mark.parametrize("native", [False, True])
def test_batched_attention_equals_the_per_row_reference(name, kv_heads, groups, sliding_window, native):
    """native: the plan of a CPU engine with the C++ kernel (every row in one kernel call per layer)."""
    if native and not native_kernels.load():
        pytest.skip("no C++ compiler or ninja: the engine uses the SDPA path")
    rows, tokens_first, keys, values = _case(CASES[name], kv_heads, groups)
    plan = AttentionPlan.build(rows, tokens_first.device, native_decode=native)
    assert (plan.native_tokens is not None) == native
    expected = reference_attention(rows, tokens_first, keys, values, sliding_window, 0.25)
    got = batched_attention(plan, tokens_first, keys, values, sliding_window, 0.25)
    assert got.shape == expected.shape == tokens_first.shape
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_plan_groups_rows_into_at_most_two_calls():
    rows, *_ = _case(CASES["prefill and decode interleaved"], 2, 3)
    plan = AttentionPlan.build(rows, "cpu")
    assert (plan.decode.num_rows, plan.decode.max_q) == (3, 1)
    assert (plan.prefill.num_rows, plan.prefill.max_q, plan.prefill.max_kv) == (3, 9, 30)
    assert not plan.identity and plan.prefill.valid is not None
    decode_only, *_ = _case(CASES["decode rows of one length (no mask)"], 2, 3)
    plan = AttentionPlan.build(decode_only, "cpu")
    assert plan.identity and plan.prefill is None and plan.decode.mask(None, 3) is None
    assert plan.decode.mask(4, 3) is not None  # a window shorter than the rows still masks


def test_engine_outputs_are_the_same_on_both_attention_paths(tiny_model, tokenizer):
    """Whole engine, mixed steps (chunked prefill, cold prompts, decode rows joining): batched == per-row."""
    from tests.support.engine_utils import mixed_step_tokens

    outputs = {}
    for batched in (True, False):
        def set_up(engine, batched=batched):
            engine.runner.batched_attention = batched

        outputs[batched] = mixed_step_tokens(tiny_model, tokenizer, set_up)
    assert all(len(o) == 8 for o in outputs[True])
    assert outputs[True] == outputs[False]
