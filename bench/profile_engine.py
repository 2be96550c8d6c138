"""Where an engine step's time goes: model forward vs sampling vs the rest (scheduler, masks, cache
bookkeeping, detokenizer), per decode step, at a few batch sizes; optional torch.profiler op table.

    .venv/bin/python bench/profile_engine.py [--batch 1,32] [--steps 16] [--ops] [--classification]

Instruments by wrapping (never editing) engine methods, so it measures the code as shipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402


class Timers:
    def __init__(self, device):
        self.device = device
        self.total = defaultdict(float)

    def wrap(self, obj, attr: str, label: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **kw):
            C.sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                C.sync(self.device)
                self.total[label] += time.perf_counter() - t0

        setattr(obj, attr, timed)


def run(args) -> dict:
    import torch

    from transformers.modeling_utils import AttentionInterface

    import softserve.engine.model_runner as mr
    import softserve.engine.packed_attention as pa

    C.setup_torch(args)
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    batches = [int(x) for x in args.batch.split(",")] if args.batch else ([1, 4] if args.quick else [1, 32, 64])
    steps = args.steps or (4 if args.quick else 16)
    model, tok, name, device, dtype = C.load(args.model, args.device, args.dtype)
    cfg = C.text_config(model)
    result = {"name": "profile_engine", "model": name, "dtype": str(dtype), "steps": steps, "rows": []}
    for b in batches:
        engine = C.make_engine(model, tok, max_batch_size=b)
        timers = Timers(device)
        runner = engine.runner
        timers.wrap(runner.model, "forward", "model forward")
        orig_sample = mr.sample

        def sample(*a, **kw):
            C.sync(device)
            t0 = time.perf_counter()
            try:
                return orig_sample(*a, **kw)
            finally:
                timers.total["sample"] += time.perf_counter() - t0

        mr.sample = sample
        timers.wrap(runner, "_flatten", "flatten rows into the packed batch")
        timers.wrap(runner, "_copy_prefix_in", "join: copy cached prompt KV into new rows")
        timers.wrap(runner, "_file_prefix", "file inline-computed prompt KV")
        attention = pa.packed_attention_forward

        def timed_attention(*a, **kw):
            t0 = time.perf_counter()
            try:
                return attention(*a, **kw)
            finally:
                C.sync(device)
                timers.total["packed attention (inside model forward)"] += time.perf_counter() - t0

        AttentionInterface.register(pa.ATTENTION_NAME, timed_attention)
        timers.wrap(engine, "postprocess", "postprocess (scheduler update, detokenize)")
        timers.wrap(engine.scheduler, "schedule", "schedule")
        lo, hi, k = (36, 44, 64) if args.classification else (48, 48, 16)
        inputs = C.request_inputs(args.seed, b, lo=lo, hi=hi, vocab=cfg.vocab_size)
        softs = [C.soft_prompt(C.vocab_prompt_tensor(model, 0 if args.same_prompt else i, k), f"p{i}") for i in range(b)]
        n_req = 0

        def add(i: int, max_tokens: int) -> None:
            nonlocal n_req
            n_req += 1
            engine.add_request(C.engine_request(f"x{b}-{n_req}", inputs[i % b], soft=softs[i % b], max_tokens=max_tokens))

        def wave() -> None:  # classification: b requests of 4 tokens, run to completion (prefill + 3 decodes)
            for i in range(b):
                add(i, 4)
            while engine.has_unfinished():
                engine.step()

        if args.classification:
            wave()  # warms the KV prefix cache of every prompt (the shape served: prompts cached)
        for i in range(0 if args.classification else b):
            # churn: 64-token requests at staggered phases, so about b/64 rows leave and join every step
            add(i, (64 - (i * 64) // b) if args.churn else steps + 3)
        engine.step()
        engine.step()
        timers.total.clear()
        prof = None
        if args.ops:
            from torch.profiler import ProfilerActivity, profile

            prof = profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else []))
            prof.__enter__()
        C.sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            if args.classification:
                wave()
                continue
            if args.churn:
                for _ in range(b - engine.num_running - engine.num_waiting):
                    add(n_req, 64)
            engine.step()
        C.sync(device)
        wall = time.perf_counter() - t0
        if prof is not None:
            prof.__exit__(None, None, None)
        mr.sample = orig_sample
        AttentionInterface.register(pa.ATTENTION_NAME, attention)
        waiting = engine.scheduler.waiting
        queued = [r for q in waiting.values() for r in q] if isinstance(waiting, dict) else list(waiting)
        for rid in [r.request_id for r in list(engine.scheduler.running) + queued]:
            engine.abort_request(rid)
        while engine.has_unfinished():
            engine.step()
        parts = {k: 1000 * v / steps for k, v in timers.total.items()}
        nested = ("packed attention (inside model forward)",)
        accounted = sum(v for k, v in parts.items() if k not in nested)
        parts["other (engine glue, tensors to device, tolist)"] = 1000 * wall / steps - accounted
        row = {"batch": b, "step_ms": 1000 * wall / steps, "parts_ms": parts, "churn": args.churn,
               "classification": args.classification}
        if prof is not None:
            row["ops"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops_rows)
        result["rows"].append(row)
        print(f"B={b}: {row['step_ms']:.1f} ms/step", file=sys.stderr, flush=True)
    return result


def render(result: dict) -> str:
    churn = any(r.get("churn") for r in result["rows"])
    shape = "continuous batching: 64-token requests, rows leave and join every step" if churn else "static decode steps"
    unit = "decode step"
    if any(r.get("classification") for r in result["rows"]):
        shape, unit = "classification waves: cached k=64 prompts, 36-44 token texts, 4 tokens", "wave"
    lines = [f"### Engine step breakdown ({result['model']} {result['dtype']}, {shape}, mean of {result['steps']} {unit}s)", ""]
    labels = []
    for r in result["rows"]:
        for k in r["parts_ms"]:
            if k not in labels:
                labels.append(k)
    rows = [[label] + [f"{r['parts_ms'].get(label, 0):.2f} ({100 * r['parts_ms'].get(label, 0) / r['step_ms']:.0f}%)"
                       for r in result["rows"]] for label in labels]
    rows.append(["whole step"] + [f"{r['step_ms']:.2f}" for r in result["rows"]])
    lines.append(C.md_table([f"ms per {unit}"] + [f"batch {r['batch']}" for r in result["rows"]], rows))
    for r in result["rows"]:
        if r.get("ops"):
            lines += ["", f"torch.profiler, batch {r['batch']}:", "", "```", r["ops"], "```"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = C.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--batch", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--ops", action="store_true", help="add a torch.profiler op table")
    p.add_argument("--churn", action="store_true", help="continuous batching: rows leave and join every step")
    p.add_argument("--classification", action="store_true",
                   help="classification shape: waves of --batch requests (own cached k=64 prompt, ~40 tokens, 4 output tokens); "
                        "--steps counts waves")
    p.add_argument("--same-prompt", action="store_true", help="every row uses one soft prompt (default: one each)")
    p.add_argument("--flush-denormal", action="store_true", help="torch.set_flush_denormal(True) first")
    p.add_argument("--ops-rows", type=int, default=15)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    result = run(args)
    C.write_json(args, result)
    print(render(result))
    return result


if __name__ == "__main__":
    main()
