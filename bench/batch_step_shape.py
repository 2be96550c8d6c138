"""What a batch row's prompt chunk costs in a step of interactive decodes, by its size (issue #25, (b)).

    .venv/bin/python bench/batch_step_shape.py [--threads N] [--rounds 3] [--steps 40] [--model smollm2]

One interactive row decodes (one token a step) while one batch row is mid-prompt. The steps are built by
hand (the runner's real forward, the scheduler's `update`), in three shapes, interleaved over rounds:
the interactive decode alone; plus a 1-token batch prompt chunk (a one-query row: the runner's decode
group, as the scheduler now schedules it beside interactive decodes); plus a 2-token chunk (the old
shape under `--max-background-tokens 2`: a second, prefill, attention group in every layer).
Printed: median step ms per shape and the ratios to the decode alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_common_args, engine_request, fmt, load, load_average, script_main, setup_torch  # noqa: E402

SHAPES = {"decode alone": 0, "+ 1-token batch chunk": 1, "+ 2-token batch chunk": 2}


def run(args) -> dict:
    import torch

    from softserve.engine.config import EngineConfig, SchedulerConfig
    from softserve.engine.engine import LLMEngine
    from softserve.engine.scheduler import ScheduledRow, SchedulerOutput

    if args.quick:
        args.model, args.rounds, args.steps = "tiny", 1, 8
    setup_torch(args)
    model, tokenizer, *_ = load(args.model, args.device, args.dtype)
    engine = LLMEngine(model, tokenizer, EngineConfig(scheduler=SchedulerConfig(
        max_batch_size=8, max_queue=10, max_background_tokens=32, background_grace_s=0, background_hold_s=0)))
    need = args.rounds * args.steps * 3 + 10  # steps, so tokens live decodes (the batch row: 3 a round-step)
    live = engine_request("live", range(100, 130), max_tokens=need)
    row = engine_request("batch", range(200, 200 + 40 + 2 * need), max_tokens=1)  # mid-prompt throughout
    row.background = True
    engine.add_request(live)
    engine.add_request(row)
    engine.step()  # both admitted: live's prompt, 32 tokens of the batch row's
    assert live.num_output_tokens == 1 and not row.num_output_tokens

    def shaped(tokens: int):
        def schedule(now=None):
            rows = [ScheduledRow(live, live.num_computed_tokens, 1, True, False)]
            if tokens:
                rows.append(ScheduledRow(row, row.num_computed_tokens, tokens, False, False))
            return SchedulerOutput(step=0, rows=rows, decode=[live])
        return schedule

    times: dict[str, list[float]] = {name: [] for name in SHAPES}
    for _ in range(args.rounds):
        for name, tokens in SHAPES.items():
            engine.scheduler.schedule = shaped(tokens)
            steps = []
            for _ in range(args.steps):
                started = time.perf_counter()
                engine.step()
                steps.append(time.perf_counter() - started)
            times[name].extend(steps[5:])  # the first steps of a shape warm its path
    medians = {name: statistics.median(values) * 1000 for name, values in times.items()}
    return {"name": "batch_step_shape", "threads": torch.get_num_threads(), "medians_ms": medians, "load_average": load_average(),
            "rounds": args.rounds, "steps": args.steps}


def render(result: dict) -> str:
    base = result["medians_ms"]["decode alone"]
    lines = [f"### Step shape: an interactive decode row plus a batch prompt chunk ({result['threads']} torch "
             f"thread(s), {result['rounds']} interleaved rounds of {result['steps']} steps)", "",
             "| step | median ms | vs the decode alone |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {fmt(ms, 1)} | {fmt(ms / base, 2)}x |" for name, ms in result["medians_ms"].items()]
    lines += ["", f"Load average {fmt(result['load_average'], 1)} after."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    return parser


def main(argv=None) -> dict:
    return script_main(build_parser, run, render, argv)

if __name__ == "__main__":
    main()
