"""Engine compute path, side by side in one run: per-row attention loop vs batched attention, fp32 vs bf16.

    .venv/bin/python bench/engine_speed.py [--threads 1] [--decode 1,16] [--steps 12] [--rounds 3] [--compiled]

Four variants (six with `--compiled`) run interleaved (step by step for decode, request wave by wave for classification), so
machine-load drift hits all alike: {fp32, bf16} x {reference: one SDPA per row per layer, batched:
one SDPA per row group per layer} (packed_attention.py); `--compiled` adds a third path, batched with
the forward compiled by inductor (compiled_forward.py, `--compile on`), compiled and warmed up first. One engine per dtype; the attention path is
switched between steps (`runner.batched_attention`), so both paths see the same rows and contexts.
Where the bf16 linears are packed (packed_linear.py, the default on CPU), an "unpacked" path runs the
batched attention with the linears on their plain weights (`F.linear`), switched the same way.

- decode C=1 and C=16: ms per decode step (median), distinct soft prompts k=16, `--context` tokens;
  each path takes `STEPS_PER_TURN` (2) steps in a row and only the last is timed (why: at the constant);
- classification: `--class-rows` requests, each its own cached k=64 prompt (KV prefix cache warm),
  ~40-token text, 4 output tokens: ms per wave (median) = prefill + 3 decode steps;
- bf16 quality: greedy agreement of the bf16 engine with the fp32 engine over the PEFT parity cases
  (prompts k=4, 8, 20 sampled from the vocabulary x the parity texts), `--agree-tokens` tokens each.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402
from softserve.engine.packed_linear import set_packed  # noqa: E402

# The texts of tests/support/peft_reference.py PROMPTS (the PEFT parity cases).
PARITY_TEXTS = ["The capital of France is", "Translate to French: good morning", "1, 2, 3, 4,", "Write a haiku about the sea"]
PATHS = ["reference", "unpacked", "gathered", "batched"]  # + "compiled" with --compiled; "unpacked" only where linears
# are packed; "gathered" (decode rows' KV gathered for SDPA) only where the native decode kernel is built
# Decode steps per path per turn, only the last one timed. A server keeps one set of weights hot; here
# the paths take turns, and the L3 of this CPU (480 MB) holds a good part of a model's weights, so a
# path timed right after another path that read other weights (fp32, or bf16 unpacked vs packed) would
# pay for cold caches that the server does not pay.
STEPS_PER_TURN = 2
COMPILED: dict[int, object] = {}  # id(runner) -> its compiled forward, built and warmed up once
NATIVE: dict[int, bool] = {}  # id(runner) -> whether its engine turned the native decode kernel on


def _timed_step(engine, device, path: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared, oversubscribed CPU the wall time mostly
    measures the neighbours; the process's CPU time is what the step itself costs."""
    engine.runner.batched_attention = path != "reference"
    set_packed(engine.runner.model, path != "unpacked")
    engine.runner.native_kernels = NATIVE[id(engine.runner)] and path not in ("gathered", "reference")
    engine.runner.compiled_forward = COMPILED[id(engine.runner)] if path == "compiled" else None
    C.sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    engine.step()
    C.sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def _paths(engine) -> list[str]:
    packed = any(getattr(m, "_softserve_packed", None) is not None for m in engine.runner.model.modules())
    return [p for p in PATHS if (p != "compiled" or id(engine.runner) in COMPILED) and (p != "unpacked" or packed)
            and (p != "gathered" or NATIVE[id(engine.runner)])]


def _medians(times: dict[str, list[tuple[float, float]]]) -> dict[str, dict[str, float]]:
    return {clock: {k: 1000 * C.median([t[i] for t in v]) for k, v in times.items()} for i, clock in enumerate(("wall", "cpu"))}


def _decode(engines, device, b: int, args, vocab: int) -> dict[str, dict[str, float]]:
    inputs = C.request_inputs(args.seed, b, lo=args.context, hi=args.context, vocab=vocab)
    times: dict[str, list[tuple[float, float]]] = {}
    for dname, (model, engine) in engines.items():
        softs = [C.soft_prompt(C.vocab_prompt_tensor(model, args.seed + i, 16), f"d{i}") for i in range(b)]
        for i in range(b):
            engine.add_request(C.engine_request(f"{dname}-d{b}-{i}", inputs[i], soft=softs[i],
                                                max_tokens=len(PATHS) * STEPS_PER_TURN * args.steps + 4))
        engine.step()  # prefill
        engine.step()
    for _ in range(args.steps):
        for dname, (_, engine) in engines.items():
            for path in _paths(engine):
                for _turn in range(STEPS_PER_TURN - 1):  # untimed: the path's own weights into the caches
                    _timed_step(engine, device, path)
                times.setdefault(f"{dname} {path}", []).append(_timed_step(engine, device, path))
    for _, engine in engines.values():
        while engine.has_unfinished():
            engine.step()
    return _medians(times)


def _classification(engines, device, args, vocab: int) -> dict[str, dict[str, float]]:
    rows = args.class_rows
    inputs = C.request_inputs(args.seed + 1, rows, lo=36, hi=44, vocab=vocab)
    softs = {d: [C.soft_prompt(C.vocab_prompt_tensor(m, 1000 + i, 64), f"c{i}") for i in range(rows)] for d, (m, _) in engines.items()}
    times: dict[str, list[tuple[float, float]]] = {}
    wave = 0
    for round_ in range(args.rounds + 1):  # round 0 warms the KV prefix cache of every prompt
        for dname, (_, engine) in engines.items():
            for path in _paths(engine):
                wave += 1
                for i in range(rows):
                    engine.add_request(C.engine_request(f"c{wave}-{i}", inputs[i], soft=softs[dname][i], max_tokens=4))
                wall = cpu = 0.0
                while engine.has_unfinished():
                    w, c = _timed_step(engine, device, path)
                    wall, cpu = wall + w, cpu + c
                if round_:
                    times.setdefault(f"{dname} {path}", []).append((wall, cpu))
    return _medians(times)


def _agreement(engines, tok, args) -> dict:
    """bf16 vs fp32 greedy tokens (batched path both) on the parity cases."""
    from softserve.engine.request import Request, SamplingParams

    outputs = {}
    for dname, (model, engine) in engines.items():
        engine.runner.batched_attention = True
        engine.runner.native_kernels = NATIVE[id(engine.runner)]
        engine.runner.compiled_forward = None
        requests = []
        for k in (4, 8, 20):
            soft = C.soft_prompt(C.vocab_prompt_tensor(model, k, k), f"pt{k}")
            for text in PARITY_TEXTS:
                requests.append(Request(request_id=f"{dname}-a{k}-{len(requests)}", prompt_ids=tok(text).input_ids,
                                        sampling=SamplingParams(max_tokens=args.agree_tokens, temperature=0.0, ignore_eos=True),
                                        soft_prompt=soft))
        done = engine.generate_sync(requests)
        outputs[dname] = [[t for o in done[r.request_id] for t in o.token_ids] for r in requests]
    pairs = list(zip(outputs["fp32"], outputs["bf16"]))
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x)) for x, y in pairs]
    same_tokens = sum(sum(a == b for a, b in zip(x, y)) for x, y in pairs)
    return {"cases": len(pairs), "identical": sum(x == y for x, y in pairs), "tokens": args.agree_tokens,
            "mean_first_difference": sum(prefix) / len(prefix),
            "position_agreement": same_tokens / sum(len(x) for x, _ in pairs)}


def run(args) -> dict:
    import torch

    C.setup_torch(args)
    decode_sizes = [int(x) for x in args.decode.split(",")]
    engines = {}
    compile_s: dict[str, float] = {}
    if args.compiled and "compiled" not in PATHS:
        PATHS.append("compiled")
    for dname, dtype in (("fp32", "float32"), ("bf16", "bfloat16")):
        model, tok, name, device, _ = C.load(args.model, args.device, dtype)
        engine = C.make_engine(model, tok, max_batch_size=max(decode_sizes + [args.class_rows]))
        engines[dname] = (model, engine)
        NATIVE[id(engine.runner)] = engine.runner.native_kernels
        if dname in args.compiled.split(","):
            t0 = time.perf_counter()
            engine.runner.use_compiled_forward(True)
            engine.runner.warm_up()
            COMPILED[id(engine.runner)] = engine.runner.compiled_forward
            compile_s[dname] = time.perf_counter() - t0
            print(f"{dname}: compiled and warmed up in {compile_s[dname]:.0f} s", file=sys.stderr, flush=True)
    vocab = C.text_config(engines["fp32"][0]).vocab_size
    result = {"name": "engine_speed", "model": name, "threads": torch.get_num_threads(), "steps": args.steps,
              "rounds": args.rounds, "context": args.context, "class_rows": args.class_rows,
              "load_avg_start": C.load_average(), "rows": [], "paths": list(PATHS), "compile_s": compile_s}
    for b in decode_sizes:
        ms = _decode(engines, device, b, args, vocab)
        result["rows"].append({"load": f"decode C={b}", "unit": "step", **ms})
        print(f"decode C={b}: {ms}", file=sys.stderr, flush=True)
    ms = _classification(engines, device, args, vocab)
    result["rows"].append({"load": f"classification {args.class_rows} rows k=64, 4 tokens", "unit": "wave", **ms})
    print(f"classification: {ms}", file=sys.stderr, flush=True)
    result["agreement"] = _agreement(engines, tok, args)
    result["load_avg_end"] = C.load_average()
    return result


def _table(result: dict, clock: str) -> str:
    paths = result.get("paths", ["reference", "batched"])
    names = {"reference": "per-row", "unpacked": "unpacked", "gathered": "gathered", "batched": "batched", "compiled": "compiled"}
    cols = [(d, p) for d in ("fp32", "bf16") for p in paths if f"{d} {p}" in result["rows"][0][clock]]
    compiled = [d for d, p in cols if p == "compiled"]
    packed = [d for d, p in cols if p == "unpacked"]
    native = [d for d, p in cols if p == "gathered"]
    rows = []
    for r in result["rows"]:
        ms = r[clock]
        ratios = [f"{ms['fp32 reference'] / ms['fp32 batched']:.2f}x", f"{ms['bf16 reference'] / ms['bf16 batched']:.2f}x"]
        ratios += [f"{ms[f'{d} unpacked'] / ms[f'{d} batched']:.2f}x" for d in packed]
        ratios += [f"{ms[f'{d} gathered'] / ms[f'{d} batched']:.2f}x" for d in native]
        ratios += [f"{ms[f'{d} batched'] / ms[f'{d} compiled']:.2f}x" for d in compiled]
        ratios += [f"{ms['fp32 batched'] / ms['bf16 batched']:.2f}x", f"{ms['fp32 reference'] / ms['bf16 batched']:.2f}x"]
        rows.append([r["load"], r["unit"], *(f"{ms[f'{d} {p}']:.1f}" for d, p in cols), *ratios])
    headers = ["load", f"{clock} ms per", *(f"{d} {names[p]}" for d, p in cols), "batched speedup fp32", "batched speedup bf16"]
    headers += [f"packed speedup {d}" for d in packed] + [f"native decode speedup {d}" for d in native]
    headers += [f"compiled speedup {d}" for d in compiled]
    return C.md_table(headers + ["bf16 speedup (batched)", "bf16 batched / fp32 per-row"], rows)


def render(result: dict) -> str:
    lines = [f"### Engine speed: attention path and dtype ({result['model']}, {result['threads']} torch threads, "
             f"medians of {result['steps']} interleaved steps / {result['rounds']} rounds)", "",
             "CPU time of the process (what a step costs; stable on a shared machine):", "", _table(result, "cpu"), "",
             "Wall time (includes waiting for the CPU behind other processes):", "", _table(result, "wall")]
    a = result["agreement"]
    lines += ["", f"bf16 vs fp32 greedy agreement over {a['cases']} parity cases ({a['tokens']} tokens each): "
              f"{a['identical']}/{a['cases']} identical, {100 * a['position_agreement']:.0f}% of positions equal, "
              f"first difference at token {a['mean_first_difference']:.1f} on average.",
              "", f"Load average {result['load_avg_start']:.2f} at start, {result['load_avg_end']:.2f} at end."]
    if result.get("compile_s"):
        lines += ["", "Compile + warm-up (all graphs): " + ", ".join(f"{d} {s:.0f} s" for d, s in result["compile_s"].items())
                  + " (wall, on the loaded machine; the inductor cache makes a restart faster)."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = C.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--decode", default="1,16", help="decode batch sizes (comma list)")
    p.add_argument("--steps", type=int, default=12, help="decode steps per variant")
    p.add_argument("--context", type=int, default=64, help="prompt tokens of a decode row")
    p.add_argument("--class-rows", type=int, default=16, help="requests per classification wave")
    p.add_argument("--rounds", type=int, default=3, help="classification waves per variant")
    p.add_argument("--compiled", default="", help="dtypes (fp32,bf16) that also run a third path: batched + the inductor-compiled "
                   "forward (--compile on); compiling takes minutes per dtype on a small CPU")
    p.add_argument("--agree-tokens", type=int, default=24, help="greedy tokens per parity case")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.decode, args.steps, args.class_rows, args.rounds, args.agree_tokens = "1,2", 2, 2, 1, 4
    return C.script_main(build_parser, lambda _: run(args), render, argv)


if __name__ == "__main__":
    main()
