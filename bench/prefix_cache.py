"""Prompt KV prefix cache: prefill cost with the cache on vs off, k = 8, 32, 128 virtual tokens.

Engine level (LLMEngine.generate_sync, max_tokens=1: one prefill step + one sampled token). Two engines
share one model: `kv_prefix_cache_bytes` default (on, warmed first with the same prompts) and
`kv_prefix_cache_bytes=0` (off: every request computes its prompt's KV, one extra forward of k
tokens per row, then the row's tokens against it). For scale, "single pass" is the plain HF
forward `model(inputs_embeds=cat(P, embed(ids)))` over the whole [k + n] sequence at once (what
PEFT does; same shapes, no padding). Cases alternate on/off/single-pass, median over repeats.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402


def run(args) -> dict:
    import torch

    C.setup_torch(args)
    quick = args.quick
    ks = [int(x) for x in args.k.split(",")] if args.k else ([8, 32] if quick else [8, 32, 128])
    batches = [int(x) for x in args.batch.split(",")] if args.batch else ([1, 2] if quick else [1, 8])
    repeats = args.repeats or (2 if quick else 5)
    n = args.prompt_tokens
    model, tok, name, device, dtype = C.load(args.model, args.device, args.dtype)
    cfg = C.text_config(model)
    on = C.make_engine(model, tok, max_batch_size=64, model_id="on")
    off = C.make_engine(model, tok, max_batch_size=64, kv_prefix_cache_bytes=0, model_id="off")
    embed = model.get_input_embeddings()
    result = {"name": "prefix_cache", "quick": quick, "model": name, "device": str(device), "dtype": str(dtype),
              "prompt_tokens": n, "repeats": repeats, "load_avg_start": C.load_average(), "rows": []}
    seq = 0

    def engine_time(engine, softs, inputs) -> float:
        nonlocal seq
        reqs = []
        for s, ids in zip(softs, inputs):
            seq += 1
            reqs.append(C.engine_request(f"r{seq}", ids, soft=s, max_tokens=1))
        C.sync(device)
        t0 = time.perf_counter()
        engine.generate_sync(reqs)
        C.sync(device)
        return time.perf_counter() - t0

    def single_pass_time(prompts, inputs) -> float:
        with torch.inference_mode():
            ids = torch.tensor(inputs, device=device)
            C.sync(device)
            t0 = time.perf_counter()
            p = torch.stack([x.to(device, dtype) for x in prompts])  # [B, k, hidden]
            x = torch.cat([p, embed(ids)], dim=1)
            model(inputs_embeds=x, logits_to_keep=1)
            C.sync(device)
            return time.perf_counter() - t0

    for k in ks:
        for b in batches:
            prompts = [C.vocab_prompt_tensor(model, 1000 * k + i, k) for i in range(b)]
            softs = [C.soft_prompt(p, f"k{k}-{i}") for i, p in enumerate(prompts)]
            inputs = C.request_inputs(args.seed + k + b, b, lo=n, hi=n, vocab=cfg.vocab_size)
            engine_time(on, softs, inputs)  # warm the cache (and the code paths)
            engine_time(off, softs, inputs)
            single_pass_time(prompts, inputs)
            t_on, t_off, t_single = [], [], []
            for r in range(repeats):
                order = [0, 1, 2] if r % 2 == 0 else [2, 1, 0]
                for case in order:
                    if case == 0:
                        t_on.append(engine_time(on, softs, inputs))
                    elif case == 1:
                        t_off.append(engine_time(off, softs, inputs))
                    else:
                        t_single.append(single_pass_time(prompts, inputs))
            kv_bytes = 2 * cfg.num_hidden_layers * (cfg.num_key_value_heads or cfg.num_attention_heads) * k * \
                (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads) * torch.empty((), dtype=dtype).element_size()
            row = {"k": k, "batch": b, "on_ms": 1000 * C.median(t_on), "off_ms": 1000 * C.median(t_off),
                   "single_pass_ms": 1000 * C.median(t_single), "kv_bytes_per_prompt": kv_bytes}
            row["off/on"] = row["off_ms"] / row["on_ms"]
            row["single/on"] = row["single_pass_ms"] / row["on_ms"]
            result["rows"].append(row)
            print(f"k={k} B={b}: on {row['on_ms']:.1f} ms, off {row['off_ms']:.1f} ms, single pass "
                  f"{row['single_pass_ms']:.1f} ms", file=sys.stderr, flush=True)
    result["cache_stats_on"] = {"hits": on.prefix_cache.hits, "misses": on.prefix_cache.misses}
    result["load_avg_end"] = C.load_average()
    return result


def render(result: dict) -> str:
    rows = [[r["k"], r["batch"], r["on_ms"], r["off_ms"], r["single_pass_ms"], r["off/on"], r["single/on"],
             r["kv_bytes_per_prompt"] / 1024] for r in result["rows"]]
    return "\n".join([
        f"### Prompt KV prefix cache (engine, {result['model']} {result['dtype']} on {result['device']}, "
        f"{result['prompt_tokens']} prompt tokens per row, 1 output token, median of {result['repeats']})",
        "",
        C.md_table(["k", "rows", "cache on ms", "cache off ms", "single-pass HF forward ms", "off/on", "single-pass/on",
                    "KV KiB per prompt"], rows, digits=2),
        "",
        "Time of one `generate_sync` with max_tokens=1 (prefill + sampling). Cache off = "
        "`EngineConfig(kv_prefix_cache_bytes=0)`: each row first runs its own k-token forward for the prompt KV. "
        f"Cache (on) counters: {result['cache_stats_on']}. Load average {result['load_avg_start']:.2f} at start, "
        f"{result['load_avg_end']:.2f} at end.",
    ])


def build_parser() -> argparse.ArgumentParser:
    p = C.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--k", default=None, help="comma list of virtual-token counts (default 8,32,128; quick 8,32)")
    p.add_argument("--batch", default=None, help="comma list of rows per prefill (default 1,8; quick 1,2)")
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> dict:
    return C.script_main(build_parser, run, render, argv)


if __name__ == "__main__":
    main()
