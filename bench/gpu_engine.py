"""The engine on a CUDA device, side by side in one run: decode paths, batch sizes, prompt mixes, host syncs.

    python bench/gpu_engine.py [--tokenizer DIR] [--shapes smollm2,1b] [--dtype bfloat16] [--json out.json]
    python bench/gpu_engine.py --device cpu --quick      # checks the script itself on a CPU (tiny model)

Models are random weights from a config, built on the device (throughput does not depend on trained
weights, and no model can be fetched on the GPU machine): `smollm2` has SmolLM2-135M's shape, `1b` a
~1B Llama (hidden 2048, 16 layers, GQA 32/8), `tiny` 2 layers. Per shape:

- decode: ms per decode step and tok/s at 1/8/32/64 rows (each its own k=16 soft prompt), for three
  paths taking turns step by step on the same rows: `reference` (one SDPA per row per layer: the old
  path), `packed` (one attention call per row group per layer), `graphs` (the step replayed as a CUDA
  graph, cuda_graphs.py);
- host syncs per decode step, per path (torch.cuda.set_sync_debug_mode): the sampled ids' copy is the
  one a step needs;
- waves: requests/s for 32 requests x 64 tokens, all on one prompt vs each on its own, graphs on;
  classification: 64 requests, each its own cached k=64 prompt, ~40 tokens, 4 out, prompt chunks of at
  most 512 tokens a step, graphs off vs on;
- a profile of one 32-row decode step per path: CUDA kernel time vs wall time;
- engine start with and without capturing the short sequences' graphs at start-up;
- peak device memory.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402

SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8),
}
PATHS = ("reference", "packed", "graphs")


def build_model(shape: str, tokenizer, device, dtype):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **SHAPES[shape])
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval().requires_grad_(False)


def engine_for(model, tokenizer, **kw):
    """An engine whose graphs are captured on first use (start-up capture is timed once, by `start_up`)."""
    return C.make_engine(model, tokenizer, capture_graphs_at_start=False, **kw)


def start_up(model, tokenizer, device) -> dict:
    """Seconds to build an engine (graphs captured on first use), then to capture what the engine's
    start-up capture would (`StepGraphs.warm_up`), in that engine."""
    C.sync(device)
    t0 = time.perf_counter()
    engine = engine_for(model, tokenizer)
    C.sync(device)
    out = {"engine_s": time.perf_counter() - t0}
    graphs = engine.runner.step_graphs
    if graphs is not None:
        t0 = time.perf_counter()
        out["graphs_done"] = graphs.warm_up()
        C.sync(device)
        out["capture_s"] = time.perf_counter() - t0
        out["capture_error"] = graphs.capture_error
    return out


def padded_graphs(engine):
    """The engine's step graphs; on a CPU the same padded steps without capture (to check this script)."""
    runner = engine.runner
    if runner.step_graphs is None and runner.device.type == "cpu":
        runner.use_step_graphs(max_kv=engine.config.scheduler.max_model_len, capture=False)
    return runner.step_graphs


def save_random_model(directory: str, tokenizer, shape: str = "smollm2") -> None:
    """An HF directory (random weights of `shape`, the tokenizer beside them) for bench/gpu.sh --model."""
    import torch

    model = build_model(shape, tokenizer, torch.device("cpu"), torch.bfloat16)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def set_path(engine, graphs, path: str) -> None:
    engine.runner.batched_attention = path != "reference"
    engine.runner.step_graphs = graphs if path == "graphs" else None


def decode_rows(model, tokenizer, rows: int, steps: int, device, paths) -> dict:
    """ms per decode step per path, the paths taking turns step by step on the same rows."""
    engine = engine_for(model, tokenizer, max_batch_size=max(rows, 1))
    graphs = padded_graphs(engine)
    hidden = C.text_config(model).hidden_size
    for i, ids in enumerate(C.request_inputs(rows, rows, lo=40, hi=48)):
        soft = C.soft_prompt(C.prompt_tensor(i, 16, hidden), f"p{i}")
        engine.add_request(C.engine_request(f"d{i}", ids, soft=soft, max_tokens=(steps + 4) * len(paths) + 8))
    engine.step()  # every prompt in one prefill step
    times: dict[str, list[float]] = {p: [] for p in paths}
    for _ in range(2):  # warm-up: cuBLAS/allocator state, graph capture
        for path in paths:
            set_path(engine, graphs, path)
            engine.step()
    for _ in range(steps):
        for path in paths:
            set_path(engine, graphs, path)
            C.sync(device)
            t0 = time.perf_counter()
            engine.step()
            C.sync(device)
            times[path].append(time.perf_counter() - t0)
    syncs = {path: count_syncs(engine, graphs, path, device) for path in paths}
    out = {}
    for path in paths:
        ms = C.median(times[path]) * 1000
        out[path] = {"ms_per_step": ms, "tok_s": rows / ms * 1000, "host_syncs_per_step": syncs[path]}
    if graphs is not None:
        out["graph_captures"] = graphs.captures
        out["graph_capture_error"] = graphs.capture_error
    return out


def count_syncs(engine, graphs, path: str, device) -> int | None:
    """Synchronizing CUDA calls in one decode step (torch's sync debug mode warns at each)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return None
    set_path(engine, graphs, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def waves(model, tokenizer, device, quick: bool) -> dict:
    """Requests/s for whole waves: one prompt vs distinct prompts (graphs on), classification (off vs on)."""
    hidden = C.text_config(model).hidden_size
    n, out_tokens = (8, 8) if quick else (32, 64)
    result = {}
    for mix in ("one_prompt", "distinct_prompts"):
        engine = engine_for(model, tokenizer, max_batch_size=n)
        shared = C.soft_prompt(C.prompt_tensor(999, 16, hidden), "shared")
        inputs = C.request_inputs(7, n)
        requests = [C.engine_request(f"{mix}{i}", ids, max_tokens=out_tokens,
                                     soft=shared if mix == "one_prompt" else C.soft_prompt(C.prompt_tensor(i, 16, hidden), f"w{i}"))
                    for i, ids in enumerate(inputs)]
        engine.generate_sync(requests[:2])  # warm-up
        C.sync(device)
        t0 = time.perf_counter()
        engine.generate_sync(requests[2:])
        C.sync(device)
        result[mix] = {"requests": n - 2, "tok_s": (n - 2) * out_tokens / (time.perf_counter() - t0)}
    rows = 16 if quick else 64
    prompts = [C.soft_prompt(C.prompt_tensor(100 + i, 64, hidden), f"c{i}") for i in range(rows)]
    for graphs_on in (False, True):
        # prompt chunks of at most 512 tokens a step: steps the graphs take (cuda_graphs.MAX_GRAPH_TOKENS)
        engine = engine_for(model, tokenizer, max_batch_size=rows, max_prefill_tokens=512)
        graphs = engine.runner.step_graphs
        engine.runner.step_graphs = graphs if graphs_on else None
        texts = C.request_inputs(11, rows, lo=36, hi=44)
        engine.generate_sync([C.engine_request(f"warm{i}", texts[i], soft=p, max_tokens=4) for i, p in enumerate(prompts)])
        samples = []
        for wave in range(3):
            batch = [C.engine_request(f"cls{graphs_on}{wave}-{i}", C.request_inputs(wave * 1000 + i, 1, lo=36, hi=44)[0],
                                      soft=p, max_tokens=4) for i, p in enumerate(prompts)]
            C.sync(device)
            t0 = time.perf_counter()
            engine.generate_sync(batch)
            C.sync(device)
            samples.append(time.perf_counter() - t0)
        result[f"classification_graphs_{'on' if graphs_on else 'off'}"] = {"rows": rows, "req_s": rows / C.median(samples)}
    return result


def profile_step(model, tokenizer, device, rows: int) -> dict:
    """One decode step per path under torch.profiler: summed CUDA kernel time vs the step's wall time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    engine = engine_for(model, tokenizer, max_batch_size=rows)
    graphs = engine.runner.step_graphs
    for i, ids in enumerate(C.request_inputs(5, rows, lo=40, hi=48)):
        engine.add_request(C.engine_request(f"prof{i}", ids, max_tokens=32))
    engine.step()
    out = {}
    for path in PATHS:
        set_path(engine, graphs, path)
        engine.step()  # warm (captures the graph)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            engine.step()
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernel_us = sum(e.self_device_time_total for e in events)
        top = sorted(events, key=lambda e: -e.self_device_time_total)[:6]
        out[path] = {"wall_ms": wall * 1000, "kernel_ms": kernel_us / 1000, "kernel_launches": sum(e.count for e in events),
                     "top_kernels": [(e.key[:60], round(e.self_device_time_total / 1000, 3)) for e in top]}
    return out


def run(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    embedded = args.tokenizer in (None, "smollm2", "embedded", "tiny")
    tokenizer = C.embedded_tokenizer() if embedded else AutoTokenizer.from_pretrained(args.tokenizer)
    args.shapes = args.shapes or ("tiny" if args.quick else "smollm2,1b")
    if args.save_model:
        save_random_model(args.save_model, tokenizer)
        return {"name": "gpu_engine", "saved": args.save_model}
    result = {"name": "gpu_engine", "device": torch.cuda.get_device_name() if device.type == "cuda" else C.cpu_model(),
              "torch": torch.__version__, "dtype": args.dtype, "shapes": {}}
    batches = [1, 4] if args.quick else [int(b) for b in args.batches.split(",")]
    steps = 3 if args.quick else args.steps
    for shape in args.shapes.split(","):
        model = build_model(shape, tokenizer, device, dtype)
        entry: dict = {"params_m": C.param_count(model) / 1e6, "decode": {}, "start_up": start_up(model, tokenizer, device)}
        print(f"[{shape}] start-up: {entry['start_up']}", flush=True)
        paths = PATHS
        for rows in batches:
            entry["decode"][rows] = decode_rows(model, tokenizer, rows, steps, device, paths)
            print(f"[{shape}] {rows} rows: {entry['decode'][rows]}", flush=True)
        entry["waves"] = waves(model, tokenizer, device, args.quick)
        print(f"[{shape}] waves: {entry['waves']}", flush=True)
        if device.type == "cuda":
            entry["profile_32_rows"] = profile_step(model, tokenizer, device, 4 if args.quick else 32)
            entry["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
            torch.cuda.reset_peak_memory_stats()
        result["shapes"][shape] = entry
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def render(result: dict) -> str:
    if "saved" in result:
        return f"saved a random model to {result['saved']}"
    lines = [f"## Engine on {result['device']} (torch {result['torch']}, {result['dtype']}, random weights)", ""]
    for shape, entry in result["shapes"].items():
        lines += [f"### {shape} ({entry['params_m']:.0f} M parameters)", ""]
        paths = [p for p in PATHS if p in next(iter(entry["decode"].values()))]
        rows = []
        for b, d in entry["decode"].items():
            cells = [b] + [f"{d[p]['ms_per_step']:.2f} ms / {d[p]['tok_s']:.0f} tok/s / {d[p]['host_syncs_per_step']} syncs" for p in paths]
            if "graphs" in d:
                cells.append(f"{d['packed']['ms_per_step'] / d['graphs']['ms_per_step']:.2f}x")
            rows.append(cells)
        headers = ["rows", *paths] + (["graphs vs packed"] if "graphs" in paths else [])
        lines += [C.md_table(headers, rows), ""]
        lines += ["waves: " + ", ".join(f"{k} {v}" for k, v in entry["waves"].items()), ""]
        lines += ["engine start: " + ", ".join(f"{k} {v}" for k, v in entry["start_up"].items()), ""]
        if "profile_32_rows" in entry:
            for path, prof in entry["profile_32_rows"].items():
                lines.append(f"- profile {path}: wall {prof['wall_ms']:.2f} ms, kernels {prof['kernel_ms']:.2f} ms in "
                             f"{prof['kernel_launches']} launches; top {prof['top_kernels'][:3]}")
            lines += [f"- peak memory {entry['peak_memory_gb']:.2f} GB", ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="two batch sizes, few steps (--shapes tiny unless given)")
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    p.add_argument("--shapes", default=None, help=f"comma-separated, of {sorted(SHAPES)} (default smollm2,1b)")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per path per batch size")
    p.add_argument("--tokenizer", "--model", dest="tokenizer", default=None,
                   help="a directory with the tokenizer the random models use (default or 'smollm2'/'tiny': the "
                        "embedded SmolLM2's)")
    p.add_argument("--save-model", default=None, metavar="DIR",
                   help="only save a random model of SmolLM2's shape with the tokenizer to DIR (for bench/gpu.sh --model)")
    p.add_argument("--json", default=None)
    return p


def main(argv: list[str] | None = None) -> dict:
    return C.script_main(build_parser, run, render, argv)


if __name__ == "__main__":
    main()
