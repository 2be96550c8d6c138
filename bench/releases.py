"""What resolving `model` costs through a release alias, side by side with the latest version and a pinned
one, in one run, rounds interleaved; no model is loaded.

On a LocalBackend store with the server's default head cache (`--store-revalidate-seconds 1`), one prompt
with two versions, `prod` -> the older one, `split` -> 90/10 over both: `tenancy.resolve_served` per
reference, timed over many calls per round, median of the rounds. The pinned and aliased-to-older cases
read the (immutable) version manifest on every call, as pinned references always have.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import common as C  # noqa: E402


def run(args) -> dict:
    import torch
    from safetensors.torch import save

    from softserve.service.auth import Principal
    from softserve.service.tenancy import resolve_served
    from softserve.store import aliases
    from softserve.store.backends import LocalBackend
    from softserve.store.store import PromptStore
    from softserve.store.types import ModelInfo

    calls = args.calls or (200 if args.quick else 5000)
    rounds = args.rounds or (2 if args.quick else 7)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        store = PromptStore(LocalBackend(Path(tmp)), ModelInfo("m", args.hidden, 2, 4), revalidate_seconds=1.0)
        versions = []
        for seed in (1, 2):
            blob = save({"prompt_embeddings": torch.randn(8, args.hidden, generator=torch.Generator().manual_seed(seed))})
            versions.append(store.put("default", "task", blob, None)[0].version)
        aliases.set_alias(store, "default", "task", "prod", [(versions[0], 1)])
        aliases.set_alias(store, "default", "task", "split", [(versions[0], 90), (versions[1], 10)])
        principal = Principal("default", "admin")
        cases = {"latest (`task`)": ("task", None), "pinned (`task@<v1>`)": (f"task@{versions[0]}", None),
                 "alias -> v1 (`task@prod`)": ("task@prod", None),
                 "split 90/10, keyed (`task@split`, user)": ("task@split", "user"),
                 "split 90/10, no key (`task@split`)": ("task@split", None)}
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(rounds):
            for name, (ref, key) in cases.items():
                started = time.perf_counter()
                for i in range(calls):
                    resolve_served(store, principal, ref, f"{key}-{i}" if key else None)
                samples[name].append((time.perf_counter() - started) / calls * 1e6)
    us = {name: statistics.median(values) for name, values in samples.items()}
    return {"name": "releases", "calls": calls, "rounds": rounds, "us_per_resolve": us,
            "load_avg_start": load_start, "load_avg_end": os.getloadavg()[0]}


def render(result: dict) -> str:
    us = result["us_per_resolve"]
    base = next(iter(us.values()))
    return "\n".join([
        "### Resolving `model` through a release alias",
        "",
        C.md_table(["reference", "µs per resolution", "ratio to latest"],
                   [[name, value, f"{value / base:.2f}x"] for name, value in us.items()], digits=1),
        "",
        f"LocalBackend, head cache 1 s; median of {result['rounds']} interleaved rounds of {result['calls']} calls; "
        f"load average {result['load_avg_start']:.2f} at start, {result['load_avg_end']:.2f} at end.",
    ])


def build_parser() -> argparse.ArgumentParser:
    p = C.add_common_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    p.add_argument("--calls", type=int, default=None, help="resolutions per round (default 5000; quick 200)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 7; quick 2)")
    p.add_argument("--hidden", type=int, default=576)
    return p


def main(argv: list[str] | None = None) -> dict:
    return C.script_main(build_parser, run, render, argv)


if __name__ == "__main__":
    main()
