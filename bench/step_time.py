"""Engine step time for two step shapes, this checkout vs another one, alternated in one run.

    .venv/bin/python bench/step_time.py [--baseline DIR] [--rounds 2] [--steps 25] [--compile on|off]

- decode: `--decode-rows` rows (16) decoding, each with its own cached soft prompt of `--k` (64) virtual
  tokens and a `--prompt-tokens` (40) text: ms per step, median of `--steps`;
- mixed: the same rows less `--prefill-rows` (3), plus that many new requests of `--prompt-tokens` each
  joining every step (1 output token, so they leave again): ms per step, median.

Each checkout runs in its own process (its own `softserve` and `bench.common`, its first on sys.path;
`--baseline DIR` is e.g. `git worktree add /tmp/base COMMIT`), one process per round, the checkouts
alternating, so machine-load drift hits both alike. Compiled (`--compile on`, the bf16 CPU server's
default) unless told otherwise; each process traces and warms its graph before timing. The native
kernels of two checkouts share one name in torch's extension cache, so each process may rebuild them
(~16 s) before it times anything.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = "STEP_TIME "
SHAPES = ("decode", "mixed")


def _worker(args) -> None:
    """Runs inside the checkout `args.worker_root` (first on sys.path) and prints one JSON line."""
    import torch

    from bench import common as C

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer, _, _, _ = C.load(args.model, "cpu", args.dtype)
    engine = C.make_engine(model, tokenizer, max_batch_size=256, max_prefill_tokens=8192)
    if args.compile == "on":
        engine.runner.use_compiled_forward(True)
        engine.runner.warm_up()
    vocab = model.config.vocab_size
    prompts = [C.soft_prompt(C.vocab_prompt_tensor(model, 1000 + i, args.k), f"p{i}") for i in range(64)]
    texts = C.request_inputs(1, 256, lo=args.prompt_tokens, hi=args.prompt_tokens, vocab=vocab)
    count = 0

    def add(rows: int, max_tokens: int) -> list[str]:
        nonlocal count
        ids = []
        for _ in range(rows):
            count += 1
            ids.append(f"r{count}")
            engine.add_request(C.engine_request(ids[-1], texts[count % 256], soft=prompts[count % 64], max_tokens=max_tokens))
        return ids

    def timed_step() -> float:
        t0 = time.perf_counter()
        engine.step()
        return (time.perf_counter() - t0) * 1000

    add(64, 1)  # every prompt's KV into the prefix cache, the graph through prefill steps
    while engine.has_unfinished():
        engine.step()
    long_rows = add(args.decode_rows, 2 * args.steps + 20)
    for _ in range(5):
        engine.step()
    decode = statistics.median(timed_step() for _ in range(args.steps))
    for rid in long_rows[:args.prefill_rows]:
        engine.abort_request(rid)
    engine.step()
    mixed = []
    for i in range(args.steps + 3):
        add(args.prefill_rows, 1)
        ms = timed_step()
        if i >= 3:
            mixed.append(ms)
    print(MARK + json.dumps({"decode": decode, "mixed": statistics.median(mixed)}), flush=True)


def _measure(root: Path, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-root", str(root), "--model", args.model,
           "--dtype", args.dtype, "--threads", str(args.threads), "--compile", args.compile, "--steps", str(args.steps),
           "--k", str(args.k), "--prompt-tokens", str(args.prompt_tokens), "--decode-rows", str(args.decode_rows),
           "--prefill-rows", str(args.prefill_rows)]
    # Each checkout builds our C++ kernels into a directory of its own: torch keeps one build per name, so
    # two checkouts with different kernel sources would otherwise rebuild at every alternation.
    extensions = Path(tempfile.gettempdir()) / "softserve-step-time" / hashlib.sha256(str(root).encode()).hexdigest()[:12]
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    raise RuntimeError(f"step_time worker in {root} failed (rc {done.returncode}):\n{done.stderr[-3000:]}")


def run(args) -> dict:
    from bench import common as C

    checkouts = {"this checkout": ROOT}
    if args.baseline:
        checkouts["baseline"] = Path(args.baseline).resolve()
    load_start = C.load_average()
    rounds: dict[str, list[dict]] = {name: [] for name in checkouts}
    for _ in range(args.rounds):
        for name, root in checkouts.items():
            rounds[name].append(_measure(root, args))
    return {"name": "step_time", "model": C.model_label(args.model), "checkouts": {name: str(root) for name, root in checkouts.items()}, "rounds": rounds,
            "load_avg_start": load_start, "load_avg_end": C.load_average(), "compile": args.compile,
            "dtype": args.dtype, "threads": args.threads, "decode_rows": args.decode_rows,
            "prefill_rows": args.prefill_rows, "prompt_tokens": args.prompt_tokens, "k": args.k}


def render(result: dict) -> str:
    from bench import common as C

    names = list(result["rounds"])
    headers = ["step"] + [f"{name} ms (rounds)" for name in names] + (["speedup (baseline / this)"] if len(names) > 1 else [])
    rows = []
    labels = {"decode": f"decode, {result['decode_rows']} rows",
              "mixed": f"mixed, {result['prefill_rows']} x {result['prompt_tokens']}-token prefill + "
                       f"{result['decode_rows'] - result['prefill_rows']} decode"}
    for shape in SHAPES:
        medians = [statistics.median(r[shape] for r in result["rounds"][name]) for name in names]
        cells = [f"{m:.1f} ({', '.join(f'{r[shape]:.1f}' for r in result['rounds'][name])})" for m, name in zip(medians, names)]
        rows.append([labels[shape]] + cells + ([f"{medians[1] / medians[0]:.2f}x"] if len(names) > 1 else []))
    return (f"### Engine step time ({result['dtype']}, compile {result['compile']}, {result['threads'] or 'default'} threads, "
            f"cached k={result['k']} prompts)\n\n" + C.md_table(headers, rows) +
            f"\n\nCheckouts: {result['checkouts']}. Load average {result['load_avg_start']:.2f} at start, "
            f"{result['load_avg_end']:.2f} at end.\n`{result.get('command', '')}`\n")


def build_parser() -> argparse.ArgumentParser:
    from bench import common as C

    p = C.add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    p.add_argument("--baseline", default=None, help="a checkout of another commit (its repository root)")
    p.add_argument("--rounds", type=int, default=2, help="processes per checkout, alternated (quick: 1)")
    p.add_argument("--steps", type=int, default=25, help="timed steps per shape and process (quick: 3)")
    p.add_argument("--compile", choices=["on", "off"], default="on", help="the compiled forward (quick: off)")
    p.add_argument("--k", type=int, default=64, help="virtual tokens of each cached soft prompt (quick: 4)")
    p.add_argument("--prompt-tokens", type=int, default=40, help="text tokens per request (quick: 8)")
    p.add_argument("--decode-rows", type=int, default=16)
    p.add_argument("--prefill-rows", type=int, default=3)
    p.add_argument("--worker-root", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict | None:
    from bench import common as C

    def parse_and_run(args) -> dict:
        if args.quick:
            args.rounds, args.steps, args.compile, args.k, args.prompt_tokens = 1, 3, "off", 4, 8
            args.decode_rows, args.prefill_rows = 4, 1
        C.setup_torch(args)
        return run(args)

    return C.script_main(build_parser, parse_and_run, render, argv)


if __name__ == "__main__":
    if "--worker-root" in sys.argv:  # the measured checkout's code first, before anything imports it
        sys.path.insert(0, sys.argv[sys.argv.index("--worker-root") + 1])
        _worker(build_parser().parse_args())
    else:
        sys.path.insert(0, str(ROOT))
        main()
