"""Run every benchmark (each as its own process), then write bench/RESULTS.md and bench/throughput.png.

    .venv/bin/python bench/run_all.py                 # full CPU run (~25-35 min on 2 cores)
    .venv/bin/python bench/run_all.py --quick         # seconds per script: checks that everything runs
    .venv/bin/python bench/run_all.py --render-only   # rebuild RESULTS.md/PNG from bench/out/<mode>/*.json
    bench/gpu.sh [--model DIR]                        # the same suite on a CUDA machine (< 8 minutes)

Each script writes JSON (bench/out/<mode>/<name>.json) and a log; RESULTS.md gets the machine facts,
the exact command lines, the goal checks and every script's tables. bench/ANALYSIS.md (hand-written:
where time goes, profiles) is appended when present.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402

SCRIPTS = ["roofline", "baselines", "load", "prefix_cache", "prompt_scale", "dtype", "adapter_kinds", "guided_cost"]
PROFILES = {
    "cpu": {},
    # A GPU run must fit in 8 minutes including start-up: shorter windows, one round.
    "gpu": {"load": ["--warmup", "2", "--window", "5", "--rounds", "1"], "baselines": ["--rounds", "1"],
            "prompt_scale": ["--warmup", "2", "--window", "5", "--cold-requests", "50"], "dtype": ["--rounds", "1"]},
}


def module(name: str):
    import importlib

    return importlib.import_module(f"bench.{name}")


def run_scripts(args, out_dir: Path, after_each=None, argv=()) -> dict:
    common = ["--model", args.model, "--device", args.device, "--dtype", args.dtype]
    if args.quick:
        common.insert(0, "--quick")
    if args.threads:
        common += ["--threads", str(args.threads)]
    selected = [s for s in SCRIPTS if (not args.only or s in args.only.split(",")) and s not in (args.skip or "").split(",")]
    meta = {"started": dt.datetime.now().isoformat(timespec="seconds"), "scripts": {},
            "suite_command": " ".join([".venv/bin/python", "bench/run_all.py", *argv])}
    C.model_path(args.model)  # build the cached model copy once, before any timing
    for name in selected:
        extra = PROFILES[args.profile].get(name, [])
        json_path = out_dir / f"{name}.json"
        argv = [*common, "--json", str(json_path.relative_to(C.REPO_ROOT) if json_path.is_relative_to(C.REPO_ROOT) else json_path), *extra]
        cmd = [sys.executable, f"bench/{name}.py", *argv]
        display = " ".join([".venv/bin/python", f"bench/{name}.py", *argv])
        print(f"== {display}", flush=True)
        load_before = C.load_average()
        t0 = time.perf_counter()
        with open(out_dir / f"{name}.log", "w") as log:
            proc = subprocess.run(cmd, cwd=C.REPO_ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
            log.write("\n--- stdout ---\n" + proc.stdout)
        elapsed = time.perf_counter() - t0
        print(proc.stdout if proc.returncode == 0 else f"!! {name} failed ({proc.returncode}), see {out_dir / (name + '.log')}",
              flush=True)
        meta["scripts"][name] = {"command": display, "returncode": proc.returncode, "elapsed_s": round(elapsed, 1),
                                 "load_before": round(load_before, 2), "load_after": round(C.load_average(), 2)}
        if after_each is not None:  # partial results survive an interrupted run
            after_each(meta)
    meta["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    return meta


def read_results(out_dir: Path) -> dict:
    results = {}
    for name in SCRIPTS:
        path = out_dir / f"{name}.json"
        if path.exists():
            results[name] = json.loads(path.read_text())
    return results


def goals(results: dict) -> list[list]:
    rows = []
    load = results.get("load")
    if load:
        ratios = [(r["concurrency"], r["b/a"]) for r in module("load").ratio_rows(load) if r.get("b/a") is not None]
        if ratios:
            worst = min(ratios, key=lambda x: x[1])
            rows.append(["1. heterogeneity tax: (b)/(a) >= 0.95 at every C", ", ".join(f"C={c}: {x:.2f}" for c, x in ratios),
                         "met" if worst[1] >= 0.95 else f"missed (C={worst[0]})"])
        zr = [(r["concurrency"], r["c/a"]) for r in module("load").ratio_rows(load) if r.get("c/a") is not None]
        if zr:
            rows.append(["   (c) Zipf / (a), for information", ", ".join(f"C={c}: {x:.2f}" for c, x in zr), ""])
    base = results.get("baselines")
    if base:
        r = base["ratios"]
        pr = base.get("paired_ratios") or module("baselines").paired_ratios(base)
        rows.append([f"2. ours (B={base['batch']} distinct prompts, in-process) >= 8x PEFT sequential (i)",
                     f"warm {r['ours_warm/peft_seq']:.1f}x, cold {r['ours_cold/peft_seq']:.1f}x (ratio of means); "
                     f"warm {pr['ours_warm/peft_seq']:.1f}x (median per-round ratio)",
                     "met" if min(r["ours_warm/peft_seq"], pr["ours_warm/peft_seq"]) >= 8 else "missed"])
        rows.append(["2. ours >= 1.0x HF generate static batch (ii)",
                     f"warm {r['ours_warm/hf_static']:.2f}x, cold {r['ours_cold/hf_static']:.2f}x, same input "
                     f"{r['ours_homog/hf_static']:.2f}x (ratio of means); warm {pr['ours_warm/hf_static']:.2f}x, same input "
                     f"{pr['ours_homog/hf_static']:.2f}x (median per-round ratio)",
                     "met" if min(r["ours_warm/hf_static"], pr["ours_warm/hf_static"]) >= 1.0 else "missed"])
        live = live_point(results)
        if live:
            tps = base["tokens_per_s"]
            rows.append([f"2. live server C={live['concurrency']} (b) vs (i) / (ii) (different processes)",
                         f"{live['tokens_per_s'] / tps['peft_seq']:.1f}x / {live['tokens_per_s'] / tps['hf_static']:.2f}x", ""])
    pc = results.get("prefix_cache")
    if pc and pc["rows"]:
        biggest = max(pc["rows"], key=lambda r: (r["k"], r["batch"]))
        rows.append(["3. prompt KV cache: prefill off/on", ", ".join(f"k={r['k']} B={r['batch']}: {r['off/on']:.2f}x" for r in pc["rows"]),
                     f"largest k: {biggest['off/on']:.2f}x"])
    ps = results.get("prompt_scale")
    if ps:
        rows.append([f"4. {ps['num_prompts']:,} prompts: list / cold first use / steady uniform vs hot",
                     f"GET /v1/prompts {ps['list_api_ms']:.0f} ms; cold p50 {ps['cold_ms']['p50']:.0f} ms vs hot "
                     f"{ps['warm_ms']['p50']:.0f} ms; {ps['steady_ratio']:.2f}x", ""])
    rl = results.get("roofline")
    if rl:
        parts = []
        for r in rl["rows"]:
            frac = r["bw_fraction"] if r["batch"] == 1 else r["flops_fraction"]
            parts.append(f"B={r['batch']}: {100 * frac:.0f}% of {'bandwidth' if r['batch'] == 1 else 'matmul peak'}")
        rows.append(["5. roofline: achieved fraction", ", ".join(parts), ""])
    dty = results.get("dtype")
    if dty:
        t = ", ".join(f"B={r['batch']}: {r['bf16/fp32']:.2f}x" for r in dty["throughput"])
        p = dty["parity"]
        rows.append(["6. bf16 vs fp32: throughput / parity", f"{t}; {p['diverged']}/{p['total']} outputs differ "
                     f"(first at median {C.fmt(p['first_divergence_median'])})", ""])
    return rows


def live_point(results: dict, conc: int = 32) -> dict | None:
    load = results.get("load")
    if not load:
        return None
    for r in load["table"]:
        if r["concurrency"] == conc and r["config"] == "b":
            return r
    return None


def plot(results: dict, path: Path) -> str | None:
    load = results.get("load")
    if not load:
        return "no load results"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): no PNG"
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    styles = {"a": ("o-", "tab:blue"), "b": ("s-", "tab:orange"), "c": ("^-", "tab:green")}
    for cfg in load["configs"]:
        pts = [(r["concurrency"], r["tokens_per_s"]) for r in load["table"] if r["config"] == cfg]
        if pts:
            style, color = styles[cfg]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=f"live server {module('load').CONFIGS[cfg]}")
    base = results.get("baselines")
    if base:
        tps = base["tokens_per_s"]
        ax.axhline(tps["peft_seq"], color="tab:red", linestyle="--", label="(i) PEFT sequential (batch 1)")
        ax.plot([base["batch"]], [tps["hf_static"]], "D", color="tab:purple", markersize=8,
                label=f"(ii) HF generate static batch {base['batch']}, homogeneous")
        ax.plot([base["batch"]], [tps["ours_warm"]], "*", color="black", markersize=12,
                label=f"ours in-process, {base['batch']} distinct prompts (warm)")
    ax.set_xscale("log", base=2)
    cs = load["concurrency"]
    ax.set_xticks(cs)
    ax.set_xticklabels([str(c) for c in cs])
    ax.set_xlabel("concurrent clients C")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"Softserve throughput, {load['model']} ({'quick' if load['quick'] else 'full'} run)")
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def render(results: dict, meta: dict, facts: dict, png_note: str | None, png_name: str) -> str:
    lines = ["# Softserve benchmarks", ""]
    mode = "quick" if any(r.get("quick") for r in results.values()) else "full"
    lines += [f"Generated by `bench/run_all.py` ({mode} run, {meta.get('started', '?')} to {meta.get('finished', '?')}). "
              "All comparisons are ratios measured side by side in one process (or against one server), with "
              "configurations interleaved, because the machine is shared and absolute numbers drift.", ""]
    lines += ["## Goals", "", C.md_table(["goal", "measured", "verdict"], goals(results)), ""]
    if png_note is None:
        lines += [f"![throughput vs concurrency]({png_name})", ""]
    else:
        lines += [f"(No throughput plot: {png_note}.)", ""]
    lines += ["## Machine", "", C.md_table(["fact", "value"], [[k, v] for k, v in facts.items()]), ""]
    lines += ["## Commands", "", f"Suite: `{meta.get('suite_command', '.venv/bin/python bench/run_all.py')}`, which ran:", "", "```"]
    for m in meta.get("scripts", {}).values():
        status = "" if m["returncode"] == 0 else f"   # FAILED rc={m['returncode']}"
        lines.append(f"{m['command']}   # {m['elapsed_s']:.0f} s, load {m['load_before']} -> {m['load_after']}{status}")
    lines += ["```", ""]
    for name in SCRIPTS:
        if name in results:
            lines += [module(name).render(results[name]) if name != "baselines"
                      else module(name).render(results[name], live_point(results)), ""]
    for hand_written in ("ANALYSIS.md", "OPERATIONS.md"):  # profiles, fairness/soak/tuning runs
        path = Path(__file__).resolve().parent / hand_written
        if path.exists() and mode == "full":
            lines += [path.read_text().strip(), ""]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--profile", default=None, choices=sorted(PROFILES), help="per-script settings (default: by device)")
    p.add_argument("--only", default=None, help="comma list of scripts")
    p.add_argument("--skip", default=None, help="comma list of scripts")
    p.add_argument("--out", default=None, help="JSON/log directory (default bench/out/<quick|full|gpu>)")
    p.add_argument("--results", default=None, help="markdown path (default bench/RESULTS.md; quick: <out>/RESULTS.md)")
    p.add_argument("--png", default=None, help="plot path (default bench/throughput.png; quick: <out>/throughput.png)")
    p.add_argument("--render-only", action="store_true", help="do not run; rebuild from the JSON in --out")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.profile = args.profile or ("gpu" if args.device == "cuda" else "cpu")
    mode = "quick" if args.quick else ("gpu" if args.profile == "gpu" else "full")
    out_dir = Path(args.out) if args.out else C.OUT_DIR / mode
    out_dir.mkdir(parents=True, exist_ok=True)
    bench_dir = Path(__file__).resolve().parent
    results_path = Path(args.results) if args.results else (out_dir / "RESULTS.md" if args.quick else bench_dir / "RESULTS.md")
    png_path = Path(args.png) if args.png else (out_dir / "throughput.png" if args.quick else bench_dir / "throughput.png")
    meta_path = out_dir / "meta.json"
    try:
        png_name = str(png_path.relative_to(results_path.parent))
    except ValueError:
        png_name = str(png_path)

    def write(meta: dict) -> None:
        meta_path.write_text(json.dumps(meta, indent=1))
        results = read_results(out_dir)
        png_note = plot(results, png_path)
        results_path.write_text(render(results, meta, meta.get("facts") or C.machine_facts(), png_note, png_name))

    if args.render_only:
        meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    else:
        for name in SCRIPTS:  # results of an earlier run in this directory must not mix with this one
            (out_dir / f"{name}.json").unlink(missing_ok=True)
        facts = C.machine_facts()
        facts["bench_threads"] = args.threads or "torch default"

        def after_each(meta: dict) -> None:
            meta["facts"] = facts
            write(meta)

        meta = run_scripts(args, out_dir, after_each, argv if argv is not None else sys.argv[1:])
        facts["load_avg_1m_end"] = round(C.load_average(), 2)
        meta["facts"] = facts
    write(meta)
    print(f"wrote {results_path} and {png_path}")
    failed = [n for n, m in meta.get("scripts", {}).items() if m["returncode"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
