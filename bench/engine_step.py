"""Engine v2 decode step vs the bare HF forward, interleaved step by step in one process.

    .venv/bin/python bench/engine_step.py [--batch 1,32] [--steps 24] [--context 64]

For each batch size B: the engine holds B decoding rows (distinct soft prompts, k=16, `--context`
prompt tokens); the reference is `model(input_ids=[B, 1], cache=DynamicCache)` at the same context
length, i.e. HF's own padded-batch decode with no engine at all. The two alternate step by step (so
machine-load drift hits both alike) and the ratio of medians is the engine's whole overhead: packing,
the per-row packed attention, sampling, scheduling and detokenizing. A ratio <= 1.0x means no cost.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402


def run(args) -> dict:
    import torch
    from transformers import DynamicCache

    C.setup_torch(args)
    batches = [int(x) for x in args.batch.split(",")] if args.batch else ([1, 4] if args.quick else [1, 32])
    steps = args.steps or (4 if args.quick else 24)
    model, tok, name, device, dtype = C.load(args.model, args.device, args.dtype)
    cfg = C.text_config(model)
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    result = {"name": "engine_step", "model": name, "dtype": str(dtype), "steps": steps, "k": args.k,
              "context": args.context, "load_avg_start": C.load_average(), "rows": []}
    for b in batches:
        engine = C.make_engine(model, tok, max_batch_size=b)
        inputs = C.request_inputs(args.seed, b, lo=args.context, hi=args.context, vocab=cfg.vocab_size)
        softs = [C.soft_prompt(C.vocab_prompt_tensor(model, args.seed + i, args.k), f"p{i}") for i in range(b)]
        for i in range(b):
            engine.add_request(C.engine_request(f"e{b}-{i}", inputs[i], soft=softs[i], max_tokens=steps + 4))
        engine.step()  # prefill
        engine.step()
        with torch.inference_mode():
            ids = torch.randint(100, 1000, (b, args.k + args.context), device=device)
            cache = DynamicCache(config=model.config)
            token = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits[:, -1].argmax(-1, keepdim=True)
        ours, raw = [], []
        for _ in range(steps):
            C.sync(device)
            t0 = time.perf_counter()
            engine.step()
            C.sync(device)
            ours.append(time.perf_counter() - t0)
            with torch.inference_mode():
                t0 = time.perf_counter()
                token = model(input_ids=token, use_cache=True, **{kw: cache}).logits[:, -1].argmax(-1, keepdim=True)
                C.sync(device)
                raw.append(time.perf_counter() - t0)
        while engine.has_unfinished():
            engine.step()
        row = {"batch": b, "engine_ms": 1000 * C.median(ours), "raw_ms": 1000 * C.median(raw)}
        row["ratio"] = row["engine_ms"] / row["raw_ms"]
        result["rows"].append(row)
        print(f"B={b}: engine {row['engine_ms']:.1f} ms, raw {row['raw_ms']:.1f} ms, {row['ratio']:.2f}x", file=sys.stderr)
    result["load_avg_end"] = C.load_average()
    return result


def render(result: dict) -> str:
    lines = [f"### Engine decode step vs bare HF forward ({result['model']} {result['dtype']}, k={result['k']}, "
             f"{result['context']} prompt tokens, median of {result['steps']} interleaved steps)", ""]
    rows = [[r["batch"], f"{r['engine_ms']:.1f}", f"{r['raw_ms']:.1f}", f"{r['ratio']:.2f}x"] for r in result["rows"]]
    lines.append(C.md_table(["batch", "engine ms/step", "bare HF forward ms/step", "engine / bare"], rows))
    lines += ["", f"Load average {result['load_avg_start']:.2f} at start, {result['load_avg_end']:.2f} at end."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = C.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--batch", default=None, help="comma list (default 1,32; quick 1,4)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--context", type=int, default=64)
    return p


def main(argv: list[str] | None = None) -> dict:
    return C.script_main(build_parser, run, render, argv)


if __name__ == "__main__":
    main()
