"""Per-tenant quotas cost O(1) per upload, and what a store GC costs (LocalBackend in a temp directory).

    .venv/bin/python bench/store_quota.py [--prompts 2000] [--uploads 50]

Side by side: the time of one upload (quota on: the usage record is read, checked and updated by
compare-and-swap) into a tenant holding 10 prompts and into one holding `--prompts`; the ratio stays
near 1 because nothing walks the tenant's prompts. Then the wall time of one `collect_garbage` over the
whole store (it reads every head), and the first upload of a tenant whose usage record is missing (a
store written before quotas: rebuilt once by a walk).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save as st_save

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from softserve.store import keys  # noqa: E402
from softserve.store.backends import LocalBackend  # noqa: E402
from softserve.store.gc import collect_garbage  # noqa: E402
from softserve.store.store import PromptStore  # noqa: E402
from softserve.store.types import ModelInfo  # noqa: E402

H = 64
MODEL = ModelInfo(name="tiny", hidden_size=H, num_layers=2, num_attention_heads=4)
CFG = json.dumps({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4}).encode()


def blob(seed: int) -> bytes:
    return st_save({"prompt_embeddings": torch.randn(4, H, generator=torch.Generator().manual_seed(seed))},
                   metadata={"format": "pt"})


def upload_ms(store: PromptStore, tenant: str, seeds: range) -> float:
    times = []
    for seed in seeds:
        data = blob(seed)
        t0 = time.perf_counter()
        store.put(tenant, f"bench-{seed}", data, CFG)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--uploads", type=int, default=50)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        backend = LocalBackend(tmp)
        store = PromptStore(backend, MODEL, max_prompts_per_tenant=10 * args.prompts, max_store_bytes_per_tenant=1 << 40)
        for seed in range(10):
            store.put("small", f"p{seed}", blob(seed), CFG)
        for seed in range(args.prompts):
            store.put("big", f"p{seed}", blob(100_000 + seed), CFG)
        small = upload_ms(store, "small", range(1_000_000, 1_000_000 + args.uploads))
        big = upload_ms(store, "big", range(2_000_000, 2_000_000 + args.uploads))
        t0 = time.perf_counter()
        report = collect_garbage(backend, 3600)
        gc_s = time.perf_counter() - t0
        backend.delete(keys.usage("big"))
        t0 = time.perf_counter()
        store.put("big", "after-rebuild", blob(3_000_000), CFG)
        rebuild_ms = (time.perf_counter() - t0) * 1000
    total = 10 + args.prompts + 2 * args.uploads
    print("### Store quotas and GC (LocalBackend)\n")
    print("| measure | value |\n| --- | --- |")
    print(f"| upload, tenant with 10 prompts (median of {args.uploads}) | {small:.2f} ms |")
    print(f"| upload, tenant with {args.prompts} prompts (median of {args.uploads}) | {big:.2f} ms |")
    print(f"| ratio big / small | {big / small:.2f} |")
    print(f"| `collect_garbage` over {total} prompts | {gc_s:.2f} s ({report.blobs_referenced} blobs referenced) |")
    print(f"| first upload after the usage record is lost ({args.prompts + args.uploads} prompts walked) | {rebuild_ms:.0f} ms |")


if __name__ == "__main__":
    main()
