"""Per-layer cost of the packed attention (bf16, SmolLM2-135M's shape: 9 query heads, 3 KV heads, d 64):
the whole step in one native call (AttentionPlan.native_tokens) vs the native decode kernel + gather +
one SDPA call for the prefill rows (the path before, still used for prefill rows over
NATIVE_PREFILL_MAX_KV positions).

    TORCH_EXTENSIONS_DIR=... PYTHONPATH=. flock /tmp/bench.lock python bench/native_attention.py

Runs both paths interleaved over a 30-layer pool, touching 16 MB between calls (the MLP weights evict
the pool between layers in a real step), and prints the median us per layer call and their ratio.
"""

from __future__ import annotations

import time

import torch

from softserve.engine import native_kernels
from softserve.engine.packed_attention import AttentionPlan, PackedRow, RowGroup, batched_attention, token_extents

LAYERS, KV_HEADS, GROUPS, HEAD_DIM = 30, 3, 3, 64
# (label, [(q_len, kv_len) per row])
SHAPES = [
    ("16 decode rows (kv 110)", [(1, 110)] * 16),
    ("13 decode + 3 x 40-token prefill (kv 104)", [(1, 110)] * 13 + [(40, 104)] * 3),
    ("13 decode + 1 x 256-token prompt", [(1, 110)] * 13 + [(256, 256)]),
    ("13 decode + 1 x 512-token prompt", [(1, 110)] * 13 + [(512, 512)]),
    ("13 decode + 1 x 1024-token prompt", [(1, 110)] * 13 + [(1024, 1024)]),
    ("13 decode + 1 x 512-token chunk at 2048", [(1, 110)] * 13 + [(512, 2048)]),
]


def main() -> None:
    torch.set_num_threads(2)
    assert native_kernels.load()
    evict = torch.randn(4 << 20)
    for label, shape in SHAPES:
        rows, q, slot = [], 0, 0
        for q_len, kv_len in shape:
            rows.append(PackedRow(q, q_len, slot, kv_len))
            q, slot = q + q_len, slot + kv_len + 64
        pool = torch.randn(LAYERS, 2, KV_HEADS, slot, HEAD_DIM).to(torch.bfloat16)
        tokens = torch.randn(q, KV_HEADS * GROUPS, HEAD_DIM).to(torch.bfloat16)
        extents = token_extents(tuple(rows))
        assert extents is not None
        plans = {"one native call": AttentionPlan(None, None, False, extents)}
        plans["kernel + SDPA"] = _split_plan(rows)
        times: dict[str, list[float]] = {name: [] for name in plans}
        for _ in range(4):
            for name, p in plans.items():
                for layer in range(LAYERS):
                    evict.add_(1.0)
                    t0 = time.perf_counter()
                    batched_attention(p, tokens, pool[layer, 0], pool[layer, 1], None, 0.125)
                    times[name].append(time.perf_counter() - t0)
        med = {name: 1e6 * sorted(ts)[len(ts) // 2] for name, ts in times.items()}
        a, b = med["one native call"], med["kernel + SDPA"]
        print(f"{label:45s} one native call {a:7.1f} us   kernel + SDPA {b:7.1f} us   ratio {b / a:.2f}x", flush=True)


def _split_plan(rows: list[PackedRow]) -> AttentionPlan:
    decode = [r for r in rows if r.q_len == 1]
    prefill = [r for r in rows if r.q_len > 1]
    return AttentionPlan(RowGroup.build(decode, "cpu", True) if decode else None,
                         RowGroup.build(prefill, "cpu") if prefill else None, not prefill)


if __name__ == "__main__":
    main()
