"""Tuning speed: our trainer (what `softserve tune` and server jobs run) vs PEFT's own training loop,
side by side in one process, on the same model, data, batches, recipe and thread count.

    .venv/bin/python bench/tuning_speed.py [--steps 30] [--rounds 2] [--threads 2] [--quick] [--pack-jobs 4]

Recipe (both): prompt tuning, k=8 virtual tokens, the same initial P, batch 8 (one forward/backward
per step, no accumulation), AdamW(lr 3e-2, betas 0.9/0.999, eps 1e-8, weight decay 0), linear decay
to 0, grad-norm clip 1.0, the same seeded data order, right padding, loss = token mean over the
completion tokens. PEFT side: `get_peft_model(model, PromptTuningConfig(...))`, `loss =
peft_model(input_ids, attention_mask, labels).loss`, `backward`, clip, `optimizer.step()`,
`scheduler.step()` - PEFT's documented training loop (`examples/causal_language_modeling`).

The two alternate in rounds (ours, PEFT, ours, PEFT, ...) so machine load hits both alike; round 1
is warm-up and left out of the summary when there are more. Reported: per-step wall times and
process CPU times (median, mean, first/last third: steps must not slow down over a run; CPU time is
the steadier measure on a shared machine), steps/s, the ratios ours/PEFT, and how far the two loss
curves are apart (same math and batches, so they should agree to float rounding).

Packed training (`--pack-jobs J`, default 4; 0 skips it): J jobs (k = 8, 4, 12, 6, ..., their own
seeds and learning rates) trained at once through one `TrainingPack` (what `--tuning-pack-jobs J`
runs in the server), against the same J jobs trained one after another; both alternate in
`--rounds` like the single-job comparison. Reported: total training examples/s of each, the ratio,
jobs per packed forward, and the largest loss difference between a job packed and alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if str(Path(__file__).resolve().parent.parent) not in sys.path:  # `python bench/tuning_speed.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_common_args, load, machine_facts, median, model_label, script_main, setup_torch  # noqa: E402

DATA_SEED = 1234


def build_parser() -> argparse.ArgumentParser:
    p = add_common_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--rounds", type=int, default=2, help="alternating runs of each trainer")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-virtual-tokens", type=int, default=8)
    p.add_argument("--dataset", default="sentiment", choices=["sentiment", "extract", "pirate"])
    p.add_argument("--pack-jobs", type=int, default=4, help="jobs trained at once in the packed comparison (0: skip)")
    p.add_argument("--pack-steps", type=int, default=10, help="steps per job in the packed comparison")
    return p


def _dataset(name: str):
    import random

    sys_path_examples()
    import make_datasets

    rng = random.Random(DATA_SEED)
    train, _ = getattr(make_datasets, name)(rng, 400, 10)
    return train


def sys_path_examples() -> None:
    examples = str(Path(__file__).resolve().parent.parent / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)


def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """The order our trainer draws (torch.randperm per epoch from a seeded generator)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    out = []
    for _ in range(steps):
        batch = []
        while len(batch) < batch_size:
            if not order:
                order = torch.randperm(n, generator=gen).tolist()
            batch.append(order.pop(0))
        out.append(batch)
    return out


def _tick(who: str, step: int, seconds: float) -> None:
    print(f"  {who} step {step}: {seconds:.2f} s", file=sys.stderr, flush=True)


def run_ours(model, tok, data, init, args) -> dict:
    from softserve.tuning.trainer import PromptTuner, TuningConfig

    cfg = TuningConfig(num_virtual_tokens=args.num_virtual_tokens, init="random", steps=args.steps,
                       learning_rate=3e-2, batch_size=args.batch_size, micro_batch_size=args.batch_size,
                       seed=args.seed, max_grad_norm=1.0)
    stamps: list[tuple[float, float]] = []
    losses: list[float] = []

    def on_progress(info) -> None:
        stamps.append((time.perf_counter(), time.process_time()))
        losses.append(info.loss)
        _tick("ours", info.step, stamps[-1][0] - (stamps[-2][0] if len(stamps) > 1 else t0[0]))

    tuner = PromptTuner(model, tok, data, None, cfg, on_progress=on_progress, initial_prompt=init)
    t0 = (time.perf_counter(), time.process_time())
    tuner.run()
    edges = [t0] + stamps
    return {"step_s": [b[0] - a[0] for a, b in zip(edges, edges[1:])],
            "cpu_s": [b[1] - a[1] for a, b in zip(edges, edges[1:])], "loss": losses}


def run_peft(model, tok, data, init, args) -> dict:
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    config = PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=args.num_virtual_tokens,
                                prompt_tuning_init=PromptTuningInit.RANDOM)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(init)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    steps = args.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, (steps - s) / steps))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    times, cpu, losses = [], [], []
    for batch in _batches(len(data), args.batch_size, steps, args.seed):
        t0, c0 = time.perf_counter(), time.process_time()
        rows = [data[i] for i in batch]
        longest = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        labels = torch.full((len(rows), longest), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r.input_ids)] = torch.tensor(r.input_ids)
            labels[i, :len(r.labels)] = torch.tensor(r.labels)
            mask[i, :len(r.input_ids)] = 1
        loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        _tick("PEFT", len(times), times[-1])
    return {"step_s": times, "cpu_s": cpu, "loss": losses}


def _pack_configs(args) -> list:
    from softserve.tuning.trainer import TuningConfig

    ks = [8, 4, 12, 6]
    return [TuningConfig(num_virtual_tokens=ks[i % len(ks)], init="vocab", steps=args.pack_steps,
                         learning_rate=3e-2 * (1 + i % 3), batch_size=args.batch_size, micro_batch_size=args.batch_size,
                         seed=args.seed + i, max_grad_norm=1.0) for i in range(args.pack_jobs)]


def run_jobs(model, tok, data, args, packed: bool) -> dict:
    """The `--pack-jobs` jobs at once in one TrainingPack, or one after another; wall time and losses."""
    import threading

    from softserve.tuning.pack import TrainingPack
    from softserve.tuning.trainer import PromptTuner

    configs = _pack_configs(args)
    pack = TrainingPack.for_model(model, tok, step_lock=threading.Lock()) if packed else None
    results: dict[int, list[float]] = {}

    def one(i: int) -> None:
        tuner = PromptTuner(model, tok, data, None, configs[i], pack=pack)
        results[i] = [h.loss for h in tuner.run().history]

    t0 = time.perf_counter()
    if packed:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(configs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(len(configs)):
            one(i)
    wall = time.perf_counter() - t0
    examples = sum(c.steps * c.batch_size for c in configs)
    who = "packed" if packed else "one after another"
    print(f"  {len(configs)} jobs {who}: {wall:.1f} s, {examples / wall:.2f} examples/s", file=sys.stderr, flush=True)
    return {"wall_s": wall, "examples": examples, "examples_per_s": examples / wall,
            "losses": [results[i] for i in range(len(configs))],
            "jobs_per_forward": (sum(pack.batch_sizes) / len(pack.batch_sizes)) if packed else 1.0}


def run_pack_comparison(model, tok, data, args) -> dict | None:
    if args.pack_jobs < 1:
        return None
    rounds = []
    for _ in range(args.rounds):
        rounds.append({"packed": run_jobs(model, tok, data, args, True),
                       "sequential": run_jobs(model, tok, data, args, False)})
    measured = rounds[1:] if len(rounds) > 1 else rounds
    def rate(who: str) -> float:
        return sum(r[who]["examples"] for r in measured) / sum(r[who]["wall_s"] for r in measured)

    gap = max(abs(a - b) / max(1.0, abs(b)) for r in rounds for pa, sa in zip(r["packed"]["losses"], r["sequential"]["losses"])
              for a, b in zip(pa, sa))
    return {"jobs": args.pack_jobs, "steps": args.pack_steps, "packed_examples_per_s": rate("packed"),
            "sequential_examples_per_s": rate("sequential"), "ratio": rate("packed") / rate("sequential"),
            "jobs_per_forward": measured[-1]["packed"]["jobs_per_forward"], "max_relative_loss_gap": gap,
            "rounds_detail": [{w: {k: v for k, v in r[w].items() if k != "losses"} for w in r} for r in rounds]}


def _summary(step_s: list[float], cpu_s: list[float] | None = None) -> dict:
    third = max(1, len(step_s) // 3)
    out = {"median_s": median(step_s), "mean_s": sum(step_s) / len(step_s), "steps_per_s": len(step_s) / sum(step_s),
           "first_third_median_s": median(step_s[:third]), "last_third_median_s": median(step_s[-third:])}
    if cpu_s:
        out.update(cpu_median_s=median(cpu_s), cpu_first_third_median_s=median(cpu_s[:third]),
                   cpu_last_third_median_s=median(cpu_s[-third:]))
    return out


def run(args) -> dict:
    import torch

    from softserve.tuning.data import parse_records, tokenize_examples
    from softserve.tuning.init import init_prompt

    setup_torch(args)
    if args.quick:
        args.steps, args.rounds = min(args.steps, 4), 1
        args.pack_jobs, args.pack_steps = min(args.pack_jobs, 2), min(args.pack_steps, 2)
    model, tok, *_ = load(args.model, args.device, args.dtype)
    model.requires_grad_(False)
    data = tokenize_examples(tok, parse_records(_dataset(args.dataset)), max_length=1024)
    init = init_prompt(model, tok, args.num_virtual_tokens, "vocab", None, seed=args.seed).float()
    rounds = []
    for r in range(args.rounds):
        ours = run_ours(model, tok, data, init, args)
        peft = run_peft(model, tok, data, init, args)
        rounds.append({"ours": ours, "peft": peft})
        print(f"round {r + 1}: ours {_summary(ours['step_s'])['steps_per_s']:.3f} steps/s, "
              f"PEFT {_summary(peft['step_s'])['steps_per_s']:.3f} steps/s", flush=True)
    # Round 1 includes first-touch warm-up for whichever ran first; report all, ratio over rounds >= 2 when there are.
    measured = rounds[1:] if len(rounds) > 1 else rounds
    def collect(who: str, key: str) -> list[float]:
        return [t for rd in measured for t in rd[who][key]]

    pack = run_pack_comparison(model, tok, data, args)
    loss_gap = max(abs(a - b) for rd in rounds for a, b in zip(rd["ours"]["loss"], rd["peft"]["loss"]))
    s_ours = _summary(collect("ours", "step_s"), collect("ours", "cpu_s"))
    s_peft = _summary(collect("peft", "step_s"), collect("peft", "cpu_s"))
    return {
        "name": "tuning_speed", "quick": args.quick, "model": model_label(args.model), "threads": torch.get_num_threads(), "steps": args.steps,
        "rounds": args.rounds, "batch_size": args.batch_size, "num_virtual_tokens": args.num_virtual_tokens,
        "dataset": args.dataset, "ours": s_ours, "peft": s_peft,
        "ratio_steps_per_s": s_ours["steps_per_s"] / s_peft["steps_per_s"],
        "ratio_median_step": s_peft["median_s"] / s_ours["median_s"],
        "ratio_median_cpu_step": s_peft["cpu_median_s"] / s_ours["cpu_median_s"],
        "max_loss_gap": loss_gap, "rounds_detail": rounds, "pack": pack, "machine": machine_facts(),
    }


def render(res: dict) -> str:
    lines = [f"tuning speed, {res['model']}, {res['dataset']}, batch {res['batch_size']}, k={res['num_virtual_tokens']}, "
             f"{res['steps']} steps x {res['rounds']} rounds, {res['threads']} threads",
             "| trainer | steps/s | median step s | mean step s | first-third / last-third median s | "
             "median CPU s per step | CPU first-third / last-third median s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, key in (("ours (PromptTuner)", "ours"), ("PEFT loop", "peft")):
        s = res[key]
        lines.append(f"| {name} | {s['steps_per_s']:.3f} | {s['median_s']:.3f} | {s['mean_s']:.3f} | "
                     f"{s['first_third_median_s']:.3f} / {s['last_third_median_s']:.3f} | {s['cpu_median_s']:.3f} | "
                     f"{s['cpu_first_third_median_s']:.3f} / {s['cpu_last_third_median_s']:.3f} |")
    lines.append(f"ratio ours/PEFT: {res['ratio_steps_per_s']:.2f}x steps/s, {res['ratio_median_step']:.2f}x by median "
                 f"wall time per step, {res['ratio_median_cpu_step']:.2f}x by median CPU time per step; "
                 f"max |loss ours - loss PEFT| per step: {res['max_loss_gap']:.2e}")
    for i, rd in enumerate(res["rounds_detail"], 1):
        lines.append(f"round {i} per-step s, ours: " + " ".join(f"{t:.2f}" for t in rd["ours"]["step_s"]))
        lines.append(f"round {i} per-step s, PEFT: " + " ".join(f"{t:.2f}" for t in rd["peft"]["step_s"]))
    pack = res.get("pack")
    if pack:
        lines.append(f"packed training, {pack['jobs']} jobs x {pack['steps']} steps: packed {pack['packed_examples_per_s']:.2f} "
                     f"examples/s vs one after another {pack['sequential_examples_per_s']:.2f} examples/s: "
                     f"{pack['ratio']:.2f}x ({pack['jobs_per_forward']:.2f} jobs per forward; max relative loss gap "
                     f"packed vs alone {pack['max_relative_loss_gap']:.1e})")
    lines.append(f"load average: {res['machine'].get('load_avg_1m', '?')}")
    lines.append(f"command: {res.get('command', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    return script_main(build_parser, run, render, argv)


if __name__ == "__main__":
    main()
