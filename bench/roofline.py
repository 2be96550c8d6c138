"""Roofline: this machine's peak matmul FLOP/s (fp32, bf16) and memory bandwidth, measured in the same
run as the engine's decode step, and the engine's achieved fraction of each.

- Batch 1 decode is bandwidth-bound: every step reads all weights once. Achieved bandwidth =
  (weight bytes + KV bytes read) / step time, as a fraction of the measured read bandwidth.
- Batch 32/64 decode is compute-bound (or should be): achieved FLOP/s = 2 * params * batch (+ the
  attention's 4 * layers * heads * head_dim * seq * batch) / step time, as a fraction of the
  measured matmul peak for the model's dtype.

"raw forward" is the bare HF model on the same shapes (a DynamicCache of the same length, no
engine), its steps interleaved with the engine's so load drift hits both alike: the ratio is the
engine's own overhead (packing, per-row attention, sampling, scheduling, detokenizing).

    .venv/bin/python bench/roofline.py [--batch 1,32,64] [--steps 16] [--k 16] [--prompt-tokens 48]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402


def _timeit(fn, device, min_time: float, min_reps: int = 3) -> float:
    """Median seconds per call, after one warm-up call; runs at least min_time seconds."""
    fn()
    C.sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < min_reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        C.sync(device)
        times.append(time.perf_counter() - t0)
    return C.median(times)


def peak_matmul(device, dtype, n: int, min_time: float) -> float:
    import torch

    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    dt = _timeit(lambda: torch.mm(a, b, out=out), device, min_time)
    return 2 * n ** 3 / dt


def bandwidth(device, nbytes: int, min_time: float) -> dict:
    import torch

    n = nbytes // 4
    x = torch.ones(n, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    read = _timeit(lambda: x.sum(), device, min_time)
    copy = _timeit(lambda: y.copy_(x), device, min_time)
    return {"read_GBps": nbytes / read / 1e9, "copy_GBps": 2 * nbytes / copy / 1e9}


def decode_steps(model, tok, device, batch: int, steps: int, k: int, n: int, seed: int) -> dict:
    """Median decode-step seconds of the engine at `batch` rows (distinct soft prompts of k tokens, n prompt
    tokens; prefill excluded) and of the bare HF forward of [batch, 1] against a cache of the same length.
    The two alternate step by step, so machine-load drift hits both alike; their ratio is the engine's
    whole overhead (packing, per-row attention, sampling, scheduling, detokenizing)."""
    import inspect

    import torch
    from transformers import DynamicCache

    engine = C.make_engine(model, tok, max_batch_size=batch)
    cfg = C.text_config(model)
    inputs = C.request_inputs(seed, batch, lo=n, hi=n, vocab=cfg.vocab_size)
    softs = [C.soft_prompt(C.vocab_prompt_tensor(model, seed + i, k), f"r{i}") for i in range(batch)]
    for i, (ids, s) in enumerate(zip(inputs, softs)):
        engine.add_request(C.engine_request(f"s{batch}-{i}", ids, soft=s, max_tokens=steps + 4))
    engine.step()  # prefill (+ first token)
    engine.step()  # first decode step (allocations)
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        ids = torch.randint(100, 1000, (batch, k + n), device=device)
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
    return {"step_s": C.median(ours), "raw_s": C.median(raw), "seq_len": k + n + 2 + steps / 2}


def run(args) -> dict:
    import torch

    C.setup_torch(args)
    quick = args.quick
    device, _ = C.resolve_device_dtype(args.device, args.dtype)
    n_mm = args.matmul_n or (512 if quick else (8192 if device.type == "cuda" else 2048))
    bw_bytes = (32 if quick else (1024 if device.type == "cuda" else 256)) * 1024 * 1024
    min_time = 0.3 if quick else 2.0
    batches = [int(x) for x in args.batch.split(",")] if args.batch else ([1, 4] if quick else [1, 32, 64])
    steps = args.steps or (4 if quick else 16)
    result = {"name": "roofline", "quick": quick, "device": str(device), "load_avg_start": C.load_average(),
              "matmul_n": n_mm, "bandwidth_bytes": bw_bytes}
    peaks = {}
    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        peaks[name] = peak_matmul(device, dt, n_mm, min_time)
        print(f"peak matmul {name}: {peaks[name] / 1e9:.1f} GFLOP/s", file=sys.stderr, flush=True)
    result["peak_flops"] = peaks
    result["bandwidth"] = bandwidth(device, bw_bytes, min_time)
    print(f"bandwidth: {result['bandwidth']}", file=sys.stderr, flush=True)

    model, tok, mname, device, dtype = C.load(args.model, args.device, args.dtype)
    cfg = C.text_config(model)
    params = C.param_count(model)
    pbytes = C.param_bytes(model)
    elem = torch.empty((), dtype=dtype).element_size()
    kv_heads = cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype_name = str(dtype).replace("torch.", "")
    peak = peaks.get(dtype_name, peaks["float32"])
    read_bw = result["bandwidth"]["read_GBps"] * 1e9
    result.update(model=mname, dtype=dtype_name, params=params, param_bytes=pbytes, steps=steps)
    rows = []
    for b in batches:
        eng = decode_steps(model, tok, device, b, steps, args.k, args.prompt_tokens, args.seed)
        seq = int(eng["seq_len"])
        raw = eng["raw_s"]
        kv_read = 2 * cfg.num_hidden_layers * kv_heads * head_dim * seq * elem * b
        flops = 2 * params * b + 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * seq * b
        row = {"batch": b, "seq_len": seq, "engine_step_ms": 1000 * eng["step_s"], "raw_step_ms": 1000 * raw,
               "engine_tokens_per_s": b / eng["step_s"],
               "bytes_per_step": pbytes + kv_read, "flops_per_step": flops}
        row["achieved_GBps"] = row["bytes_per_step"] / eng["step_s"] / 1e9
        row["bw_fraction"] = row["bytes_per_step"] / eng["step_s"] / read_bw
        row["achieved_GFLOPs"] = flops / eng["step_s"] / 1e9
        row["flops_fraction"] = flops / eng["step_s"] / peak
        row["raw_bw_fraction"] = row["bytes_per_step"] / raw / read_bw
        row["raw_flops_fraction"] = flops / raw / peak
        row["engine_overhead"] = eng["step_s"] / raw - 1
        rows.append(row)
        print(f"B={b}: engine {row['engine_step_ms']:.1f} ms/step, raw {row['raw_step_ms']:.1f} ms/step",
              file=sys.stderr, flush=True)
    result["rows"] = rows
    result["load_avg_end"] = C.load_average()
    return result


def render(result: dict) -> str:
    peaks = result["peak_flops"]
    bw = result["bandwidth"]
    lines = [
        f"### Roofline ({result['model']} {result['dtype']} on {result['device']}, {result['params'] / 1e6:.1f} M params = "
        f"{result['param_bytes'] / 1e6:.0f} MB of weights)",
        "",
        C.md_table(["measured peak", "value"], [
            [f"matmul fp32 ({result['matmul_n']}^3)", f"{peaks['float32'] / 1e9:.1f} GFLOP/s"],
            [f"matmul bf16 ({result['matmul_n']}^3)", f"{peaks['bfloat16'] / 1e9:.1f} GFLOP/s"],
            [f"memory read (sum over {result['bandwidth_bytes'] >> 20} MiB)", f"{bw['read_GBps']:.1f} GB/s"],
            ["memory copy (read + write)", f"{bw['copy_GBps']:.1f} GB/s"],
        ]),
        "",
    ]
    rows = []
    for r in result["rows"]:
        bound = "bandwidth" if r["batch"] == 1 else "compute"
        frac = r["bw_fraction"] if r["batch"] == 1 else r["flops_fraction"]
        raw_frac = r["raw_bw_fraction"] if r["batch"] == 1 else r["raw_flops_fraction"]
        achieved = f"{r['achieved_GBps']:.1f} GB/s" if r["batch"] == 1 else f"{r['achieved_GFLOPs']:.1f} GFLOP/s"
        rows.append([r["batch"], r["seq_len"], r["engine_step_ms"], r["raw_step_ms"], f"{100 * r['engine_overhead']:.0f}%",
                     r["engine_tokens_per_s"], bound, achieved, f"{100 * frac:.0f}%", f"{100 * raw_frac:.0f}%"])
    lines.append(C.md_table(["batch", "seq", "engine ms/step", "raw HF forward ms/step", "engine overhead", "tok/s",
                             "roof", "achieved", "fraction of peak", "raw forward fraction"], rows, digits=1))
    lines += ["", f"Decode steps only (prefill excluded), median of {result['steps']}, the engine's and the raw "
              "forward's steps interleaved (engine overhead = their ratio - 1). Batch-1 bytes = all weights "
              "(the tied embedding counted once, as the LM head reads it) + KV read; FLOPs = 2 x params x batch + "
              f"attention. Load average {result['load_avg_start']:.2f} at start, {result['load_avg_end']:.2f} at end."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = C.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--batch", default=None, help="comma list (default 1,32,64; quick 1,4)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--matmul-n", type=int, default=None)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=48)
    return p


def main(argv: list[str] | None = None) -> dict:
    return C.script_main(build_parser, run, render, argv)


if __name__ == "__main__":
    main()
