"""Start-up of `softserve serve` until /ready: eager vs the compiled forward, with inductor's on-disk cache
empty (a first start on a machine) and warm (every restart after it). Issue #22: "warm it up at start-up
and cache it across restarts if you can".

The starts run one after another on the same model, each its own server process with
TORCHINDUCTOR_CACHE_DIR pointing at one fresh directory (emptied first), so "cold" really is cold and
"warm" reuses exactly what the cold start wrote. The native kernels are built before the first start (a
throwaway server), so no variant pays their one-time build.

    .venv/bin/python bench/startup.py --dtype bfloat16 --threads 2
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402

VARIANTS = [("eager", "off", False), ("compiled, empty inductor cache", "on", True), ("compiled, warm inductor cache", "on", False)]


class _Server(C.Server):
    def __init__(self, *args, inductor_cache: Path, **kwargs):
        super().__init__(*args, **kwargs)
        self.inductor_cache = inductor_cache

    def environment(self) -> dict[str, str]:
        return {**super().environment(), "TORCHINDUCTOR_CACHE_DIR": str(self.inductor_cache)}


def _start(root: Path, args, compile_setting: str, cache: Path) -> tuple[float, str]:
    server = _Server(root / "store", model=C.model_path(args.model), dtype=args.dtype, threads=args.threads, log_dir=root,
                     extra_args=["--compile", compile_setting, "--log-level", "info"], inductor_cache=cache)
    t0 = time.perf_counter()
    server.start(timeout=1800.0)
    seconds = time.perf_counter() - t0
    server.stop()
    compiled = [line for line in server.logs(20_000).splitlines() if "model forward compiled in" in line]
    return seconds, (compiled[-1].split('"msg": "')[-1].rstrip('"}') if compiled else "")


def run(args) -> dict:
    root = Path(tempfile.mkdtemp(prefix="softserve-startup-"))
    cache = root / "inductor"
    result: dict = {"name": "startup", "model": C.model_label(args.model), "dtype": args.dtype, "threads": args.threads,
                    "rounds": args.rounds, "load_avg_start": C.load_average(), "machine": C.machine_facts(), "starts": []}
    try:
        _start(root, args, "off", cache)  # builds the native kernels (torch caches them) before anything is timed
        for r in range(args.rounds):
            for label, setting, empty_first in VARIANTS:
                if empty_first:
                    shutil.rmtree(cache, ignore_errors=True)
                seconds, note = _start(root, args, setting, cache)
                result["starts"].append({"round": r, "variant": label, "ready_s": seconds, "log": note})
                print(f"round {r} {label}: ready in {seconds:.1f} s {note}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    result["load_avg_end"] = C.load_average()
    return result


def render(result: dict) -> str:
    by_variant: dict[str, list[float]] = {}
    for start in result["starts"]:
        by_variant.setdefault(start["variant"], []).append(start["ready_s"])
    eager = min(by_variant["eager"])
    lines = [f"### Start-up until /ready ({result['model']}, {result['dtype']}, {result['threads'] or 'default'} threads, "
             f"load {result['load_avg_start']:.1f} -> {result['load_avg_end']:.1f})", "",
             "| start | seconds (each round) | vs eager |", "| --- | --- | --- |"]
    for label, _, _ in VARIANTS:
        times = by_variant[label]
        lines.append(f"| {label} | {', '.join(f'{t:.1f}' for t in times)} | {min(times) / eager:.2f}x |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = C.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.set_defaults(dtype="bfloat16")
    p.add_argument("--rounds", type=int, default=1, help="times each variant starts (default 1)")
    return p


def main(argv: list[str] | None = None) -> dict:
    return C.script_main(build_parser, run, render, argv)


if __name__ == "__main__":
    main()
