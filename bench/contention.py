"""What the HTTP side's CPU work costs a decode step, as a thread of the engine's process vs as another
process (issue #22: "the engine in its own process").

A live server does more than the forward: the event loop parses requests, tokenizes, detokenizes and
writes SSE. In one process that work also takes the GIL; in another process it would not. This runs the
engine's C=16 decode step (distinct k=16 prompts) in this process with a stand-in for that work, a
pure-Python busy loop holding `--duty` of one core in periods of `--period-ms`, run (a) nowhere, (b) in
a thread of this process, (c) in a child process, interleaved round by round, each variant over a fresh
batch so contexts match. If (b) cost much more than (c), moving the engine apart from HTTP would pay.

    .venv/bin/python bench/contention.py --dtype bfloat16 --threads 2 --duty 0.1,0.25
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402

VARIANTS = ("alone", "thread", "process")
SPAWN = multiprocessing.get_context("spawn")


def busy(stop, duty: float, period: float) -> None:
    """`duty` of each `period` seconds in pure Python (it holds the GIL), the rest asleep."""
    while not stop.is_set():
        started = time.perf_counter()
        while time.perf_counter() - started < duty * period:
            sum(i * i for i in range(200))
        time.sleep(period * (1 - duty))


def _steps(engine, inputs, softs, steps: int, tag: str) -> list[float]:
    for i, ids in enumerate(inputs):
        engine.add_request(C.engine_request(f"{tag}-{i}", ids, soft=softs[i], max_tokens=steps + 2))
    engine.step()  # prefill
    engine.step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    while engine.has_unfinished():
        engine.step()
    return times


def run(args) -> dict:
    if args.quick:
        args.batch, args.steps, args.rounds, args.duty, args.context = min(args.batch, 4), min(args.steps, 4), 1, "0.25", 8
    C.setup_torch(args)
    model, tok, name, device, _ = C.load(args.model, args.device, args.dtype)
    engine = C.make_engine(model, tok, max_batch_size=args.batch)
    vocab = C.text_config(model).vocab_size
    inputs = C.request_inputs(args.seed, args.batch, lo=args.context, hi=args.context, vocab=vocab)
    softs = [C.soft_prompt(C.vocab_prompt_tensor(model, args.seed + i, 16), f"c{i}") for i in range(args.batch)]
    duties = [float(x) for x in args.duty.split(",")]
    period = args.period_ms / 1000
    result: dict = {"name": "contention", "model": name, "dtype": str(next(model.parameters()).dtype), "threads": args.threads,
                    "batch": args.batch, "steps": args.steps, "rounds": args.rounds, "period_ms": args.period_ms,
                    "load_avg_start": C.load_average(), "ms": {}}
    _steps(engine, inputs, softs, 2, "warm")
    for r in range(args.rounds):
        for duty in duties:
            for variant in VARIANTS:
                stop: Any = None
                worker: Any = None
                if variant == "thread":
                    stop = threading.Event()
                    worker = threading.Thread(target=busy, args=(stop, duty, period))
                elif variant == "process":  # spawn: a fork of a process holding an OpenMP pool is not safe
                    stop = SPAWN.Event()
                    worker = SPAWN.Process(target=busy, args=(stop, duty, period))
                if worker is not None:
                    worker.start()
                    time.sleep(0.5 if variant == "process" else 0.05)
                times = _steps(engine, inputs, softs, args.steps, f"{r}-{duty}-{variant}")
                if worker is not None:
                    stop.set()
                    worker.join()
                key = f"{duty}|{variant}"
                result["ms"].setdefault(key, []).append(1e3 * statistics.median(times))
                print(f"round {r} duty {duty} {variant}: {1e3 * statistics.median(times):.1f} ms/step", file=sys.stderr, flush=True)
    result["load_avg_end"] = C.load_average()
    return result


def render(result: dict) -> str:
    ms = result["ms"]
    duties = sorted({float(k.split("|")[0]) for k in ms})
    lines = [f"### Contention: the HTTP side's work as a thread vs a process ({result['model']}, {result['dtype']}, "
             f"{result['threads'] or 'default'} threads, C={result['batch']} decode, median ms per step over rounds, "
             f"load {result['load_avg_start']:.1f} -> {result['load_avg_end']:.1f})", "",
             "| busy share of one core | alone ms | in a thread ms | in a process ms | thread vs alone | process vs alone | thread vs process |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for duty in duties:
        alone, thread, proc = (statistics.median(ms[f"{duty}|{v}"]) for v in VARIANTS)
        lines.append(f"| {duty:.0%} | {alone:.1f} | {thread:.1f} | {proc:.1f} | {thread / alone:.2f}x | {proc / alone:.2f}x | "
                     f"{thread / proc:.2f}x |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = C.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--batch", type=int, default=16, help="decode rows")
    p.add_argument("--context", type=int, default=64, help="prompt tokens of a row")
    p.add_argument("--steps", type=int, default=25, help="timed decode steps per variant")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duty", default="0.1,0.25", help="busy share of one core (comma list)")
    p.add_argument("--period-ms", type=float, default=40.0, help="busy/sleep period")
    return p


def main(argv: list[str] | None = None) -> dict:
    return C.script_main(build_parser, run, render, argv)


if __name__ == "__main__":
    main()
