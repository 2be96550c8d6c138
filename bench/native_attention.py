"""Per-layer cost of the packed attention (bf16, SmolLM2-135M's shape: 9 query heads, 3 KV heads, d 64):
the whole step in one native call (AttentionPlan.native_tokens) vs the native decode kernel + gather +
one SDPA call for the prefill rows (the path before, still used for prefill rows over
NATIVE_PREFILL_MAX_KV positions).

    .venv/bin/python bench/native_attention.py [--threads 2] [--repeats 4]

Runs both paths interleaved over a 30-layer pool, touching 16 MB between calls (the MLP weights evict
the pool between layers in a real step), and prints the median us per layer call and their ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench import common as C  # noqa: E402
from softserve.engine import native_kernels  # noqa: E402
from softserve.engine.packed_attention import (  # noqa: E402
    AttentionPlan,
    PackedRow,
    RowGroup,
    batched_attention,
    token_extents,
)

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


def run(args) -> dict:
    C.setup_torch(args)
    if not native_kernels.load():
        raise SystemExit("the native kernels did not build here (a C++ compiler and ninja are needed)")
    layers, repeats, shapes = (2, 1, SHAPES[:2]) if args.quick else (LAYERS, args.repeats, SHAPES)
    evict = torch.randn(4 << 20)
    load_start = C.load_average()
    results = []
    for label, shape in shapes:
        rows, q, slot = [], 0, 0
        for q_len, kv_len in shape:
            rows.append(PackedRow(q, q_len, slot, kv_len))
            q, slot = q + q_len, slot + kv_len + 64
        pool = torch.randn(layers, 2, KV_HEADS, slot, HEAD_DIM).to(torch.bfloat16)
        tokens = torch.randn(q, KV_HEADS * GROUPS, HEAD_DIM).to(torch.bfloat16)
        extents = token_extents(tuple(rows))
        assert extents is not None
        plans = {"one native call": AttentionPlan(None, None, False, extents)}
        plans["kernel + SDPA"] = _split_plan(rows)
        times: dict[str, list[float]] = {name: [] for name in plans}
        for _ in range(repeats):
            for name, p in plans.items():
                for layer in range(layers):
                    evict.add_(1.0)
                    t0 = time.perf_counter()
                    batched_attention(p, tokens, pool[layer, 0], pool[layer, 1], None, 0.125)
                    times[name].append(time.perf_counter() - t0)
        med = {name: 1e6 * sorted(ts)[len(ts) // 2] for name, ts in times.items()}
        results.append({"shape": label, "native_us": med["one native call"], "split_us": med["kernel + SDPA"]})
    return {"name": "native_attention", "threads": torch.get_num_threads(), "shapes": results,
            "load_avg_start": load_start, "load_avg_end": C.load_average()}


def render(result: dict) -> str:
    rows = [[r["shape"], r["native_us"], r["split_us"], f"{r['split_us'] / r['native_us']:.2f}x"] for r in result["shapes"]]
    return (f"### Packed attention per layer call: one native call vs kernel + SDPA (bf16, {result['threads']} threads)\n\n"
            + C.md_table(["rows", "one native call us", "kernel + SDPA us", "speedup"], rows)
            + f"\n\nLoad average {result['load_avg_start']:.2f} at start, {result['load_avg_end']:.2f} at end.\n"
            f"`{result.get('command', '')}`\n")


def build_parser() -> argparse.ArgumentParser:
    p = C.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--repeats", type=int, default=4, help="passes over the layers per path (quick: 1)")
    return p


def main(argv: list[str] | None = None) -> dict:
    return C.script_main(build_parser, run, render, argv)


def _split_plan(rows: list[PackedRow]) -> AttentionPlan:
    decode = [r for r in rows if r.q_len == 1]
    prefill = [r for r in rows if r.q_len > 1]
    return AttentionPlan(RowGroup.build(decode, "cpu", True) if decode else None,
                         RowGroup.build(prefill, "cpu") if prefill else None, not prefill)


if __name__ == "__main__":
    main()
