"""What a finished tuning job leaves in the store (standalone; no other bench/ module needed).

    .venv/bin/python bench/job_store_bytes.py            # tiny random Llama (hidden 64), seconds
    .venv/bin/python bench/job_store_bytes.py --smollm   # SmolLM2-135M (hidden 576), a minute or two

Runs one tuning job through the server's TuningManager on a fresh LocalBackend directory (default:
20 steps, checkpoint_every 5, k=8, 64 examples), waits until it has finished and been cleaned up, and
prints the bytes under the store by part: the job's record, data copy, events, resume checkpoints and
lease, the finished-job index, and the prompts it published (blobs + manifests + heads). Then, where
the code has a retention sweep (`TuningManager.sweep`), it sweeps as if the retention period had
passed and prints the bytes again.

Before/after a code change: run it once from a checkout of each version (PYTHONPATH=<checkout>).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import common as C  # noqa: E402


def load(smollm: bool):
    from softserve.model_loader import embedded_model_source, load_model

    source = embedded_model_source()
    if smollm:
        model, tok = load_model(source, torch.device("cpu"), torch.float32)
        return model, tok
    model, tok = C.load_tiny()
    return model, tok


def part_of(key: str) -> str:
    if key.startswith("blobs/") or "/prompts/" in key:
        return "published prompts (blobs, manifests, heads)"
    if key.startswith("tuning/active/"):
        return "tuning/active/ marker"
    if key.startswith("tuning/finished/"):
        return "tuning/finished/ index"
    if key.startswith("tuning/finished-index"):
        return "tuning/finished-index.json (once per store)"
    if "/tuning/jobs/" in key:
        rest = key.split("/tuning/jobs/", 1)[1].split("/", 1)[1]
        return {"record.json": "job record", "lease.json": "job lease"}.get(rest, "job " + rest.split("/")[0])
    return "other (" + key.split("/")[-1] + ")"


def measure(root: str) -> Counter:
    sizes: Counter = Counter()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for fn in filenames:
            if fn.startswith("."):
                continue
            key = os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, "/")
            sizes[part_of(key)] += os.path.getsize(os.path.join(dirpath, fn))
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smollm", action="store_true", help="the embedded SmolLM2-135M instead of the tiny random Llama")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--checkpoint-every", type=int, default=5)
    p.add_argument("--num-virtual-tokens", type=int, default=8)
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--json", action="store_true", help="print JSON only")
    args = p.parse_args(argv)

    from softserve.store.backends import LocalBackend
    from softserve.store.store import PromptStore
    from softserve.tuning.config import TuningConfig
    from softserve.tuning.export import model_info
    from softserve.tuning.job import new_job_id
    from softserve.tuning.jobs import TuningManager
    from softserve.tuning.records import new_record

    model, tok = load(args.smollm)
    root = tempfile.mkdtemp(prefix="job-store-bytes-")
    store = PromptStore(LocalBackend(root), model_info(model, "m"), revalidate_seconds=0)
    manager = TuningManager(model, tok, store, model_name="m", scan_seconds=0.05)
    words = "apple river stone cloud tiger lemon violin candle forest mirror pepper rocket".split()
    data = "".join(json.dumps({"prompt": f"Word: {words[i % len(words)]} {i}\nLabel:",
                               "completion": " yes" if i % 2 else " no"}) + "\n" for i in range(args.examples))
    cfg = TuningConfig(num_virtual_tokens=args.num_virtual_tokens, init="vocab", steps=args.steps, batch_size=8,
                       micro_batch_size=4, learning_rate=0.03, seed=0, max_length=200)
    record = new_record(job_id=new_job_id(), tenant="acme", namespace="acme", name="measured", model="m", config=cfg,
                        checkpoint_every=args.checkpoint_every, auto=[], num_examples={"train": args.examples,
                                                                                       "validation": 0},
                        training_file=None, validation_file=None, description=None, suffix=None, metadata=None)
    job_id = manager.submit(record, {"train": data}).id
    deadline = time.monotonic() + 1800
    while time.monotonic() < deadline:
        rec = manager.get("acme", job_id)
        if rec["status"] in ("succeeded", "failed", "cancelled") and ("acme", job_id) not in manager.jobs.active() \
                and manager.jobs.lease_holder("acme", job_id) is None:
            break
        time.sleep(0.05)
    time.sleep(0.2)  # the worker's lease release and local clean-up
    finished = measure(root)
    swept = None
    if hasattr(manager, "sweep") and manager.retention_seconds > 0:
        manager.sweep(now=time.time() + manager.retention_seconds + 1)
        swept = measure(root)
    manager.close()
    result = {"model": "SmolLM2-135M" if args.smollm else "tiny (hidden 64)", "status": rec["status"],
              "steps": args.steps, "checkpoint_every": args.checkpoint_every, "checkpoints": len(rec["checkpoints"]),
              "k": args.num_virtual_tokens, "examples": args.examples,
              "after_finish": dict(sorted(finished.items())), "after_finish_total": sum(finished.values()),
              "after_retention": dict(sorted(swept.items())) if swept is not None else None,
              "after_retention_total": sum(swept.values()) if swept is not None else None, "store": root}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['model']}: {rec['status']}, {args.steps} steps, {len(rec['checkpoints'])} checkpoints, "
          f"k={args.num_virtual_tokens}, {args.examples} examples; store {root}")
    parts = sorted(set(finished) | set(swept or {}))
    print(f"{'part':48} {'after finish':>14} {'after retention':>16}")
    for part in parts:
        after = "-" if swept is None else str(swept.get(part, 0))
        print(f"{part:48} {finished.get(part, 0):>14} {after:>16}")
    print(f"{'total':48} {sum(finished.values()):>14} {'-' if swept is None else sum(swept.values()):>16}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
