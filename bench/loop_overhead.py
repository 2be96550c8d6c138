"""Serving overhead around the forward (issue #22): a live server's engine loop vs the engine alone.

    .venv/bin/python bench/loop_overhead.py [--baseline DIR] [--concurrency 16] [--max-tokens 32] [--rounds 3]

Runs, interleaved round by round (the order flips every round) so machine-load drift hits all alike:

- `engine alone`: an LLMEngine in this process, C closed-loop rows (a finished request is replaced at
  once), no HTTP: the ceiling a live server could reach;
- `live`: `softserve serve` from this checkout under bench/loop_probe.py (timers around the step's
  parts, CPU time per thread), C streaming clients (bench/load.py's closed loop: C distinct k=16 prompts,
  32-64 prompt tokens, `--max-tokens` tokens, greedy, `stream: true`);
- `live baseline` (with `--baseline DIR`, a checkout of another commit, e.g. `git worktree add
  /tmp/ss-main main`): the same server from that code, so before/after is measured in one run.

Per variant: output tokens/s, wall ms per engine step and where it goes (forward = ModelRunner.run,
schedule, postprocess incl. detokenize, the loop between steps, and time outside any step), and CPU
share of the event-loop thread (HTTP, SSE, asyncio), the engine thread and the rest (torch's OpenMP
workers, the thread pool).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402
from bench import load as L  # noqa: E402

PROBE = Path(__file__).resolve().parent / "loop_probe.py"


class ProbeServer(C.Server):
    """A bench server run through loop_probe.py, importing softserve from `code_root`."""

    def __init__(self, store: Path, code_root: Path, stats: Path, extra_env: dict[str, str] | None = None,
                 **kwargs) -> None:
        super().__init__(store, **kwargs)
        self.code_root, self.stats, self.extra_env = code_root, stats, extra_env or {}
        self.launcher = [sys.executable, str(PROBE), str(stats)]
        self.cwd = code_root

    def environment(self) -> dict[str, str]:
        return {**super().environment(), **self.extra_env, "PYTHONPATH": str(self.code_root)}

    def snapshot(self) -> dict:
        return json.loads(self.stats.read_text())


def _delta(a: dict, b: dict) -> dict:
    wall = b["t"] - a["t"]
    steps = max(1, b["steps"] - a["steps"])

    def part(label: str, kind: str = "wall") -> float:
        return 1000 * (b[kind].get(label, 0.0) - a[kind].get(label, 0.0)) / steps

    step, gap = part("step"), 1000 * (b["gap_s"] - a["gap_s"]) / steps
    tokens = max(1, b["tokens"] - a["tokens"])
    cpu = {k: 1000 * (b["cpu"][k] - a["cpu"][k]) / steps for k in b["cpu"]}  # CPU ms per step, per thread group
    forward_cpu = part("forward", "part_cpu")
    return {
        "engine_tokens_per_s": (b["tokens"] - a["tokens"]) / wall, "steps": steps,
        "ms_per_step": 1000 * wall / steps, "forward_ms": part("forward"), "schedule_ms": part("schedule"),
        "postprocess_ms": part("postprocess"), "detokenize_ms": part("detokenize"), "step_ms": step,
        "loop_gap_ms": gap, "outside_ms": 1000 * wall / steps - step - gap,
        "cpu_forward": forward_cpu, "cpu_engine_rest": cpu["engine"] - forward_cpu, "cpu_event_loop": cpu["event_loop"],
        "cpu_other": cpu["other"], "cpu_total": sum(cpu.values()),
        "cpu_request_intake": sum(part(k, "part_cpu") for k in ("resolve_model", "tokenize", "pin_prompt")),
        "cpu_us_per_token_around": 1000 * (sum(cpu.values()) - forward_cpu) * steps / tokens,
        "forward_wall_per_cpu": part("forward") / forward_cpu if forward_cpu else None,
    }


async def _live_round(server: ProbeServer, args, inputs) -> dict:
    snaps: list[dict] = []

    async def snapshots() -> None:
        await asyncio.sleep(args.warmup)
        snaps.append(server.snapshot())
        await asyncio.sleep(args.window)
        snaps.append(server.snapshot())

    conc = args.concurrency
    raw, _ = await asyncio.gather(
        L.closed_loop(server.url, conc, L.make_chooser("b", conc, []), inputs, max_tokens=args.max_tokens,
                      warmup=args.warmup, window=args.window, seed=args.seed),
        snapshots())
    s = L.summarize(raw)
    return {"tokens_per_s": s["tokens_per_s"], "errors": s["num_errors"], "itl_p50_ms": C.median(s["itl_ms"]),
            **_delta(*snaps)}


def _offline_round(engine, softs, inputs, args) -> dict:
    """C closed-loop rows on the engine alone; the forward timed by wrapping runner.run."""
    import torch

    runner = engine.runner
    forward = {"s": 0.0, "cpu": 0.0}
    real_run = runner.run

    def timed_run(sched):
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return real_run(sched)
        finally:
            forward["s"] += time.perf_counter() - t0
            forward["cpu"] += time.thread_time() - c0

    runner.run = timed_run
    serial = [0]

    def add(slot: int) -> None:
        serial[0] += 1
        engine.add_request(C.engine_request(f"off-{serial[0]}", inputs[serial[0] % len(inputs)], soft=softs[slot],
                                            max_tokens=args.max_tokens))
        owner[f"off-{serial[0]}"] = slot

    owner: dict[str, int] = {}
    for slot in range(args.concurrency):
        add(slot)
    t_window, t_end = time.perf_counter() + args.warmup, time.perf_counter() + args.warmup + args.window
    tokens = steps = 0
    t0 = c0 = f0 = fc0 = None
    with torch.inference_mode():
        while time.perf_counter() < t_end:
            if t0 is None and time.perf_counter() >= t_window:
                t0, c0, f0, fc0 = time.perf_counter(), time.process_time(), forward["s"], forward["cpu"]
                tokens = steps = 0
            outputs = engine.step()
            steps += 1
            for out in outputs:
                tokens += len(out.token_ids)
                if out.finished:
                    add(owner.pop(out.request_id))
    wall = time.perf_counter() - t0
    for request_id in list(owner):
        engine.abort_request(request_id)
    while engine.has_unfinished():
        engine.step()
    runner.run = real_run
    return {"tokens_per_s": tokens / wall, "engine_tokens_per_s": tokens / wall, "steps": steps,
            "ms_per_step": 1000 * wall / steps, "forward_ms": 1000 * (forward["s"] - f0) / steps,
            "cpu_forward": 1000 * (forward["cpu"] - fc0) / steps,
            "cpu_total": 1000 * (time.process_time() - c0) / steps,
            "cpu_us_per_token_around": 1e6 * (time.process_time() - c0 - forward["cpu"] + fc0) / tokens,
            "forward_wall_per_cpu": (forward["s"] - f0) / (forward["cpu"] - fc0)}


def run(args) -> dict:
    import torch

    if args.quick:
        args.rounds, args.concurrency = 1, min(args.concurrency, 4)
        args.warmup, args.window = min(args.warmup, 1.0), min(args.window, 2.0)
    C.setup_torch(args)
    mdir = C.model_path(args.model)
    hidden = L.hidden_size(mdir)
    inputs = C.request_inputs(args.seed, 4096)
    model, tok, name, device, _ = C.load(args.model, args.device, args.dtype)
    engine = C.make_engine(model, tok, max_batch_size=max(32, args.concurrency))
    softs = [C.soft_prompt(C.prompt_tensor(1000 + i, args.k, hidden).to(next(model.parameters()).dtype), f"het-{i}")
             for i in range(args.concurrency)]
    result = {"name": "loop_overhead", "model": name, "threads": torch.get_num_threads(), "concurrency": args.concurrency,
              "max_tokens": args.max_tokens, "k": args.k, "warmup_s": args.warmup, "window_s": args.window,
              "rounds": args.rounds, "baseline": str(args.baseline) if args.baseline else None,
              "load_avg_start": C.load_average(), "runs": []}
    roots = {"live": (C.REPO_ROOT, args.live_args)}
    for spec in args.also:  # "LABEL:FLAGS": this checkout again, with other server flags
        label, _, flags = spec.partition(":")
        roots[f"live {label}"] = (C.REPO_ROOT, flags)
    if args.baseline:
        roots["live baseline"] = (Path(args.baseline).resolve(), "")
    with tempfile.TemporaryDirectory(prefix="softserve-bench-loop-") as tmp:
        servers = {}
        try:
            for label, (root, words) in roots.items():
                d = Path(tmp) / label.replace(" ", "-")
                # NAME=VALUE words are the server's environment (e.g. GOMP_SPINCOUNT=10000), the rest its flags
                env_words = [w for w in words.split() if "=" in w and not w.startswith("-")]
                env = dict(w.split("=", 1) for w in env_words)
                flags = " ".join(w for w in words.split() if w not in env_words)
                server = ProbeServer(d / "store", root, d / "stats.json", extra_env=env, model=mdir, device=args.device,
                                     dtype=args.dtype, log_dir=d, threads=args.threads or torch.get_num_threads(),
                                     extra_args=["--max-batch-size", str(max(32, args.concurrency)), *flags.split()])
                servers[label] = server.start()
                items = [(f"het-{i}", C.safetensors_bytes(C.prompt_tensor(1000 + i, args.k, hidden)))
                         for i in range(args.concurrency)]
                C.upload_prompts(server.url, items)
                asyncio.run(L._warm(server.url, [n for n, _ in items]))
            result["server_command"] = servers["live"].display_command()
            result["variants"] = {label: flags for label, (_, flags) in roots.items()}
            variants = ["engine alone", *servers]
            for r in range(args.rounds):
                for label in (variants if r % 2 == 0 else variants[::-1]):
                    if label == "engine alone":
                        row = _offline_round(engine, softs, inputs, args)
                    else:
                        row = asyncio.run(_live_round(servers[label], args, inputs))
                    row.update(variant=label, round=r, load_avg=C.load_average())
                    result["runs"].append(row)
                    print(f"round {r} {label}: {row['tokens_per_s']:.1f} tok/s, {row['ms_per_step']:.1f} ms/step, "
                          f"forward {row['forward_ms']:.1f} ms, load {row['load_avg']:.2f}", file=sys.stderr, flush=True)
        finally:
            for server in servers.values():
                server.stop()
    result["load_avg_end"] = C.load_average()
    return result


COLUMNS = [("tokens_per_s", "tok/s", 1), ("ms_per_step", "wall ms/step", 1), ("forward_ms", "forward", 1),
           ("schedule_ms", "schedule", 2), ("postprocess_ms", "postprocess", 2), ("detokenize_ms", "of it detokenize", 2),
           ("loop_gap_ms", "between steps", 2), ("outside_ms", "outside steps", 2),
           ("cpu_forward", "CPU forward", 1), ("cpu_engine_rest", "CPU engine thread rest", 2),
           ("cpu_event_loop", "CPU event loop", 2), ("cpu_other", "CPU other threads", 2),
           ("cpu_request_intake", "of it resolve + tokenize + pin", 2), ("cpu_total", "CPU total", 1),
           ("cpu_us_per_token_around", "CPU µs/token outside the forward", 0),
           ("forward_wall_per_cpu", "forward wall / CPU", 2)]


def _mean_rows(result: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for label in dict.fromkeys(r["variant"] for r in result["runs"]):
        runs = [r for r in result["runs"] if r["variant"] == label]
        out[label] = {k: sum(r[k] or 0.0 for r in runs) / len(runs) for k, _, _ in COLUMNS if k in runs[0]}
        out[label]["rounds"] = [round(r["tokens_per_s"], 1) for r in runs]
    return out


def render(result: dict) -> str:
    rows = _mean_rows(result)
    lines = [f"### Serving overhead around the forward ({result['model']}, {result['threads']} torch threads, "
             f"C={result['concurrency']} streaming clients, distinct k={result['k']} prompts, {result['max_tokens']} tokens, "
             f"{result['rounds']} interleaved rounds x {result['window_s']:.0f} s)", "",
             "Means over rounds, per engine step: wall ms (forward = ModelRunner.run; postprocess includes detokenize),"
             " then CPU ms by thread (at 1 torch thread the forward runs on the engine thread; 'other' is torch's "
             "OpenMP workers and the thread pool):", ""]
    table = [[label] + [row.get(k) for k, _, _ in COLUMNS] + [", ".join(f"{x:.0f}" for x in row["rounds"])]
             for label, row in rows.items()]
    lines.append(C.md_table(["variant"] + [h for _, h, _ in COLUMNS] + ["tok/s per round"], table, digits=2))
    alone = rows.get("engine alone", {}).get("tokens_per_s")
    ratios = [f"{label} / engine alone: {row['tokens_per_s'] / alone:.2f}x" for label, row in rows.items()
              if label != "engine alone" and alone]
    for label, row in rows.items():
        if label not in ("live", "engine alone"):
            ratios.append(f"live / {label}: {rows['live']['tokens_per_s'] / row['tokens_per_s']:.2f}x "
                          f"(CPU outside the forward per token: {rows['live']['cpu_us_per_token_around'] / row['cpu_us_per_token_around']:.2f}x)")
    lines += ["", "Ratios of tokens/s: " + "; ".join(ratios) + ".", "",
              f"Server: `{result.get('server_command')}` under bench/loop_probe.py; baseline checkout: "
              f"{result['baseline'] or 'none'}; variants' extra flags: {result.get('variants')}. Load average {result['load_avg_start']:.2f} at start, "
              f"{result['load_avg_end']:.2f} at end."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = C.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--baseline", default=None, help="a checkout of the code to compare with (its repository root)")
    p.add_argument("--live-args", default="", help="extra `softserve serve` flags of this checkout's server")
    p.add_argument("--also", action="append", default=[],
                   help="LABEL:FLAGS, another server of this checkout with these flags; NAME=VALUE words set its environment (repeatable)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--k", type=int, default=16, help="virtual tokens per soft prompt")
    p.add_argument("--warmup", type=float, default=4.0)
    p.add_argument("--window", type=float, default=12.0)
    p.add_argument("--rounds", type=int, default=3)
    return p


def main(argv: list[str] | None = None) -> dict:
    return C.script_main(build_parser, run, render, argv)


if __name__ == "__main__":
    main()
