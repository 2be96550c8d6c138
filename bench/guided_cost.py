"""Cost of guided decoding: output tok/s with half the rows constrained vs none, same engine, same inputs.

    .venv/bin/python bench/guided_cost.py [--concurrency 16] [--steps 48] [--rounds 3]

In process (no HTTP), closed loop at C rows: every finished request is replaced at once. Each
request is 32-64 prompt tokens + a soft prompt, 64 generated tokens (min_tokens = max_tokens so
lengths are equal in both phases). Constrained rows alternate two grammars that never complete within
64 tokens: a JSON-like array of strings (`\\["[a-z ]+"(,"[a-z ]+")*`, never closed) and a lower-case
text regex, so each step pays a real mask computation. Phases alternate round by round (none, half,
half, none, ...) so load drift from other processes hits both alike; the headline is the ratio.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402

GRAMMARS = [("regex", r'\["[a-z ]+"(,"[a-z ]+")*'), ("regex", r"[a-z][a-z ,.]*")]


def run(args) -> dict:
    from softserve.engine.request import GuidedSpec

    C.setup_torch(args)
    model, tok, name, device, dtype = C.load(args.model, args.device, args.dtype)
    cfg = C.text_config(model)
    conc = args.concurrency or (2 if args.quick else 16)
    steps = args.steps or (3 if args.quick else 48)
    rounds = args.rounds or (1 if args.quick else 3)
    max_tokens = 8 if args.quick else 64
    inputs = C.request_inputs(args.seed, conc * 4, vocab=cfg.vocab_size)
    softs = [C.soft_prompt(C.vocab_prompt_tensor(model, i, 8), f"p{i}") for i in range(conc)]
    engine = C.make_engine(model, tok, max_batch_size=conc)
    counter = 0

    def add(constrained: bool) -> None:
        nonlocal counter
        counter += 1
        guided = None
        if constrained:
            kind, value = GRAMMARS[counter % len(GRAMMARS)]
            guided = GuidedSpec(kind, value)
        engine.add_request(C.engine_request(f"g{counter}", inputs[counter % len(inputs)], soft=softs[counter % conc],
                                            max_tokens=max_tokens, guided=guided))

    def phase(fraction: float) -> tuple[int, float]:
        added = 0

        def top_up() -> None:
            nonlocal added
            while engine.num_running + engine.num_waiting < conc:
                added += 1
                add(constrained=(added % 2 == 0) if fraction else False)

        top_up()
        for _ in range(3):  # warm-up: the batch fills and the grammar caches warm
            engine.step()
            top_up()
        tokens = 0
        C.sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            tokens += sum(len(o.token_ids) for o in engine.step())
            top_up()
        C.sync(device)
        wall = time.perf_counter() - t0
        for rid in [r.request_id for r in list(engine.scheduler.running)] + \
                [r.request_id for q in engine.scheduler.waiting.values() for r in q]:
            engine.abort_request(rid)
        while engine.has_unfinished():
            engine.step()
        return tokens, wall

    totals = {"none": [0, 0.0], "half": [0, 0.0]}
    order = []
    for r in range(rounds):
        for label in (("none", "half") if r % 2 == 0 else ("half", "none")):
            tokens, wall = phase(0.5 if label == "half" else 0.0)
            totals[label][0] += tokens
            totals[label][1] += wall
            order.append({"round": r, "phase": label, "tok_s": tokens / wall})
            print(f"round {r} {label}: {tokens / wall:.1f} tok/s", file=sys.stderr, flush=True)
    tok_s = {k: v[0] / v[1] for k, v in totals.items()}
    return {"name": "guided_cost", "model": name, "dtype": str(dtype), "concurrency": conc, "steps": steps,
            "rounds": rounds, "tok_s": tok_s, "ratio": tok_s["half"] / tok_s["none"], "phases": order}


def render(result: dict) -> str:
    rows = [["none", C.fmt(result["tok_s"]["none"])], ["50% of rows", C.fmt(result["tok_s"]["half"])],
            ["ratio (goal >= 0.9)", f"{result['ratio']:.2f}x"]]
    return "\n".join([f"### Guided decoding cost ({result['model']} {result['dtype']}, C={result['concurrency']}, "
                      f"{result['steps']} steps x {result['rounds']} rounds per phase)", "",
                      C.md_table(["rows constrained", "output tok/s"], rows)])


def build_parser() -> argparse.ArgumentParser:
    p = C.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    return p


def main(argv: list[str] | None = None) -> dict:
    return C.script_main(build_parser, run, render, argv)


if __name__ == "__main__":
    main()
